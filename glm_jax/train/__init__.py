"""Pre-training: the jitted step, loss-free balancing, metrics, checkpoints and the loop."""
