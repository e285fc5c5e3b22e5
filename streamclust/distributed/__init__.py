"""The same model from mergeable states: the mergeable accumulators and the Dask replay of a recording."""
