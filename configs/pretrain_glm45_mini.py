"""Pre-train glm45_mini (6.6 B total, 1.7 B active) on one GPU, bfloat16."""

from glm_jax.train.config import base_config


def get_config():
    config = base_config()
    config.workdir = "workdir/pretrain_glm45_mini"
    config.model.preset = "glm45_mini"
    config.model.overrides = dict(param_dtype="float32", dtype="bfloat16", remat="dots_no_batch")
    config.steps = 10_000
    config.schedule_steps = 10_000
    config.warmup_steps = 500
    config.seq_len = 4096
    config.batch_size = 16
    config.micro_batches = 4
    config.log_every = 10
    config.checkpoint_every = 500
    config.tokenizer_path = ""  # GLM-4.5's tokenizer.json, or --config.train_tokenizer=True
    config.tokenizer_vocab_size = 32_768  # what train_tokenizer=True would train
    config.peak_flops_per_device = 989e12  # H100 SXM dense bf16
    return config
