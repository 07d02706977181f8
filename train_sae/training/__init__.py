"""Training: the activation loader, sweep configs and grid, the one-pass trainer, checkpoints and saved formats."""
