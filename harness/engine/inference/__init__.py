"""A fitted method on the test images: precision and compilation, prediction, timing, FLOPs, scores,
and the maps of test images that have no public ground truth (written for the dataset's server)."""
