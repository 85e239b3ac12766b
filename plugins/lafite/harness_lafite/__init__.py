"""The lafite method plugin (work in progress)."""
