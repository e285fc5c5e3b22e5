"""Stage 3: incremental PCA of the scaled features, the randomized PCA of a position sample, and the
compact per-position store (with its memory-mapped spill) that later read-outs project."""
