"""The pieces of the training loop, one idea per module: config, setup (what a run is built from), resume,
state, checkpointing (a run's checkpoints and their upload), nonfinite, reporting, optim, ema, run identity,
lease, preemption and the torch.distributed helpers. `yolo.train` holds the loop that uses them."""
