"""GRPO of the SFT'd `tiny` model with GLM-4.5's RL recipe on top (SPEC.md §4): the two-stage
difficulty curriculum and the dynamic temperature. CPU, minutes.

Stage 1 trains on the moderate prompts of a 128-prompt pool (solved by some, not all, of 8
samples); from step 30 on the hard ones, scaled down from the report's pass@8 = 0 and
pass@512 > 0 to pass@4 = 0 and pass@32 > 0 for a model this small. Every 20 steps the
held-out set is scored at four temperatures and the rollouts continue at the hottest within
1% of the best."""

from configs import grpo_tiny


def get_config(algorithm: str = "grpo"):
    config = grpo_tiny.get_config(algorithm)
    config.workdir = f"workdir/grpo_tiny_recipe_{algorithm}"
    cur = config.rl.curriculum
    cur.enabled, cur.pool, cur.samples = True, 128, 8
    cur.switch_step, cur.zero_at, cur.nonzero_at = 30, 4, 32
    dynamic = config.rl.dynamic_temperature
    dynamic.every, dynamic.temperatures, dynamic.samples = 20, "0.6,0.8,1.0,1.2", 2
    return config
