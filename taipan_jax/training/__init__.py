"""Training: optimizer, train/eval steps, checkpoints, metrics and the loop."""
