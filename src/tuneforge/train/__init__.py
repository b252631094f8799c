"""Training: the entry point, run directory, checkpoints, callbacks, quickstart."""
