"""A fitted method on the test images: precision and compilation, prediction, timing, FLOPs, scores."""
