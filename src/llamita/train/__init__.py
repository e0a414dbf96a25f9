"""Training: the loop, optimizer and schedule, checkpoints, metrics; parallelism is applied from outside."""
