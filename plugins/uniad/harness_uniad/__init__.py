"""UniAD (You et al., NeurIPS 2022) as a harness method plugin."""
