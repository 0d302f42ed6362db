"""Pre-train GLM-4.5 (355 B) on a pod: the report's recipe (SPEC.md §3). Needs the sharding
rules of glm_jax.sharding and a real tokenizer.json / corpus."""

from glm_jax.train.config import base_config


def get_config():
    config = base_config()
    config.workdir = "workdir/pretrain_glm45"
    config.model.preset = "glm45"
    # Expert-parallel buffers of 1.25x the balanced share, not 2x: 6.9 GiB less per chip in the
    # TPU compiler's plan at 128 chips (BUILD.md); imbalance beyond it costs an extra pass.
    config.model.overrides = dict(param_dtype="float32", dtype="bfloat16", remat="full",
                                  ep_capacity_factor=1.25)
    # Muon's momentum stored in bfloat16 (DeepSeek-V3 keeps its AdamW moments in bfloat16): 5.2
    # GiB less per chip at 128 chips, where the TPU compiler's peak goes 48.0 -> 42.7 GiB.
    config.momentum_dtype = "bfloat16"
    config.steps = 500_000
    config.schedule_steps = 500_000
    config.warmup_steps = 2_000
    config.seq_len = 4096
    config.micro_batches = 16
    config.batch_size = 16384  # 64M tokens per step after the batch-size warm-up
    config.batch_warmup.start_batch = 4096  # 16M tokens
    config.batch_warmup.ramp_tokens = 500 * 10**9
    config.log_every = 10
    config.checkpoint_every = 1_000
    config.tokenizer_path = ""  # GLM-4.5's tokenizer.json
    config.peak_flops_per_device = 989e12
    return config
