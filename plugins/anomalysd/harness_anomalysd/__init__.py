"""The anomalysd method plugin (work in progress)."""
