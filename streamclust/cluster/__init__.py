"""Stage 4: fuzzy C-means (batch and mini-batch, Numba kernels with NumPy twins), validity indices,
the new-material drift test, the second level on the host phase, composition merges and spatial pooling."""
