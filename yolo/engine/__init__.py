"""The pieces of the training loop, one idea per module: optimiser and schedules, EMA, run identity,
checkpoint state and its sink, preemption signals, and the torch.distributed set-up."""
