"""What the engine's stages lean on: mid-fit checkpoints, per-job locks, Ctrl-C and SIGTERM, progress
bars, files written atomically, nested state without pickle, the environment a record names, and
the dataset's files checked and summarised (``harness data``, the preflight)."""
