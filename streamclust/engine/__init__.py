"""The streaming engine that runs stages 1-4 on each batch, and the thresholded cluster centres
(stage 5) that it feeds."""
