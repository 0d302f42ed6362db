"""GRPO of the SFT'd `tiny` model on the built-in sorting task: CPU, minutes.

`--config=configs/grpo_tiny.py` is GLM-4.5's GRPO; `:dapo` and `:dr_grpo` pick the other
presets. The starting policy is the `sft_tiny_careless` workdir (SFT data in which half of the
lists were sorted the wrong way); when it holds no checkpoint yet, that SFT config runs into it
first. RL then has to find, from the reward alone, which of the two learnt behaviours is right:
held-out 0.10 -> 0.60 in 240 steps (RESULTS.md). Addition is left out: the 3-layer model barely
learns it (0.03-0.10 after SFT, and RL did not move it), so its groups are all zero-reward.

Muon normalises every update, so in RL (a weak, noisy gradient) the learning rate sets the step
size outright: at 2e-3 the policy collapsed within 20 steps (held-out 0.33 -> 0.0, every answer
truncated); 3e-4 is stable (measured, experiments/benchmarks/RESULTS.md)."""

from pathlib import Path

from glm_jax.rl.loop import grpo_base_config


def get_config(algorithm: str = "grpo"):
    config = grpo_base_config(algorithm)
    config.workdir = f"workdir/grpo_tiny_{algorithm}"
    config.init = "workdir/sft_tiny_careless"
    config.init_sft_config = str(Path(__file__).with_name("sft_tiny_careless.py"))
    config.steps = 240
    config.schedule_steps = 240
    config.warmup_steps = 5
    config.peak_learning_rate = 3e-4
    config.floor_learning_rate = 3e-5
    config.seq_len = 128
    config.rl.kinds = "sort"
    config.checkpoint_every = 40
    config.rl.group_size = 8
    config.rl.groups_per_step = 8
    config.rl.max_new_tokens = 64
    config.rl.temperature = 1.0
    if algorithm == "dapo":
        # DAPO's overlong shaping penalises the last `overlong_cache` (16) tokens of the budget.
        # Worked answers run to 66 tokens, so at 64 it penalised correct answers and the policy
        # collapsed (held-out 0.43 -> 0.15); at 96 only runaways pay (RESULTS.md).
        config.seq_len = 160
        config.rl.max_new_tokens = config.eval.max_new_tokens = 96
    config.eval.every = 40
    config.eval.problems = 60
    config.eval.samples = 4  # eval_reward_sampled: avg@4 at the rollout temperature
    return config
