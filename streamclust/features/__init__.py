"""Stage 1-2 of the data flow: per-frame and per-spectrum reduction to feature vectors, streaming robust
statistics (median, interquartile range) and the balance of the CBED and EDS blocks."""
