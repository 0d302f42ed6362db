"""GRPO of an SFT'd glm45_mini (6.6 B total, 1.7 B active) on one GPU.

Rollouts and training share the device: the KV-cache engine samples from the training state's
own arrays (`nnx.merge` of the live parameters, no copy), so one set of weights lives on the
GPU, beside the optimizer state, the rollout KV cache and the training activations. The policy
is `--config.init`: an SFT workdir of glm45_mini or a Hugging Face directory holding a
GLM-4.5-style checkpoint and its tokenizer.json (the chat tokens are checked). Its dtype and
remat policy are the ones the policy was saved with (the SFT config's model overrides).

`:dapo` and `:dr_grpo` pick the other presets. Untested on a GPU so far (none has been lent):
the sizes are starting points, not measured optima."""

from glm_jax.rl.loop import grpo_base_config


def get_config(algorithm: str = "grpo"):
    config = grpo_base_config(algorithm)
    config.workdir = f"workdir/grpo_glm45_mini_{algorithm}"
    config.init = "workdir/sft_glm45_mini"
    config.num_devices = 1
    config.steps = 500
    config.schedule_steps = 500
    config.warmup_steps = 10
    config.peak_learning_rate = 1e-5
    config.floor_learning_rate = 1e-6
    config.seq_len = 4096
    config.micro_batches = 32  # 256 rows of 4,096 tokens, 8 rows per forward/backward
    config.checkpoint_every = 50
    config.keep_checkpoints = 2
    rl = config.rl
    rl.kinds = "add,sort,calculator"
    rl.group_size = 16
    rl.groups_per_step = 16
    rl.max_rounds = 3
    rl.max_new_tokens = 3072
    rl.rollout_batch_size = 128
    rl.temperature = 1.0
    rl.reward_workers = 8
    config.eval.every = 25
    config.eval.problems = 256
    config.eval.max_new_tokens = 3072
    config.eval.batch_size = 128
    return config
