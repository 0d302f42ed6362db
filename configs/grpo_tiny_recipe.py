"""GRPO of the SFT'd `tiny` model with GLM-4.5's RL recipe on top (SPEC.md §4): the two-stage
difficulty curriculum, the dynamic temperature and agentic RL with a tool. CPU, minutes.

Stage 1 trains on the moderate prompts of a 64-prompt pool (solved by some, not all, of 8
samples); stage 2 on the hard ones, scaled down from the report's pass@8 = 0 and pass@512 > 0
to pass@4 = 0 and pass@16 > 0 for a model this small, from when the stage-1 training reward
stops rising (its mean over 5 steps up less than 0.01 on the 5 before) or step 15 at the
latest. Every 15 steps the held-out set is scored at three temperatures and the rollouts
continue at the hottest within 1% of the best. The `calculator_answer` problems are played as
multi-turn episodes against the calculator environment (call, the tool's answer as an
`<|observation|>` turn, then the boxed product), trained on the model's own tokens only; the
episodes' ~80 completion tokens after a ~200-token prompt set the lengths. The starting policy
is `sft_tiny_agentic` (sft_tiny continued with the episodes), trained first when absent."""

from pathlib import Path

from configs import grpo_tiny


def get_config(algorithm: str = "grpo"):
    config = grpo_tiny.get_config(algorithm)
    config.workdir = f"workdir/grpo_tiny_recipe_{algorithm}"
    config.init = "workdir/sft_tiny_agentic"  # sft_tiny continued with the episodes
    config.init_sft_config = str(Path(__file__).with_name("sft_tiny_agentic.py"))
    config.rl.kinds = "add,sort,calculator_answer"
    config.rl.env, config.rl.max_turns = "calculator", 3
    config.seq_len, config.rl.max_new_tokens, config.eval.max_new_tokens = 320, 96, 96
    # episodes cost ~4x a single-turn rollout on CPU (a 200-token prompt, up to 3 turns): half
    # the rows per step, half the steps and a smaller pool keep the run within ~15 minutes
    config.steps = config.schedule_steps = 30
    config.rl.groups_per_step = 4
    config.eval.problems = 30
    config.eval.every, config.checkpoint_every = 10, 10
    cur = config.rl.curriculum
    cur.enabled, cur.pool, cur.samples = True, 64, 8
    cur.switch_step, cur.plateau_window, cur.plateau_delta = 15, 5, 0.01
    cur.zero_at, cur.nonzero_at = 4, 16
    dynamic = config.rl.dynamic_temperature
    dynamic.every, dynamic.temperatures, dynamic.samples = 15, "0.6,0.8,1.0", 1
    return config
