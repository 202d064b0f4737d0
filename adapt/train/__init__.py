"""Training: the stages, the loop, its optimiser, checkpoints, DeepSpeed, logging."""
