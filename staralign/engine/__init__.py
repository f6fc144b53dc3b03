"""Engine: the training loop, evaluation, EMA, checkpoints and multi-process set-up."""
