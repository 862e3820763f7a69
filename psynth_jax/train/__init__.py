"""Training: data, losses, the train step and checkpoints."""
