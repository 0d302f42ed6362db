"""The README demo: pretrain_tiny run longer (about a minute and a half on 2 CPU cores)."""

from configs import pretrain_tiny


def get_config():
    config = pretrain_tiny.get_config()
    config.workdir = "workdir/demo"
    config.steps = 300
    config.schedule_steps = 300
    config.warmup_steps = 20
    config.checkpoint_every = 100
    config.log_every = 10
    return config
