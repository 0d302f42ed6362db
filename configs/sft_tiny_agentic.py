"""`sft_tiny` continued for 100 steps with the multi-turn calculator episodes
(`calculator_answer`: call, the tool's answer, the boxed product) among the kinds: the starting
policy of the agentic recipe (`grpo_tiny_recipe.py`). Runs `sft_tiny.py` first when its
workdir holds no checkpoint.

Measured: SFT from scratch on all four kinds at 400 steps learnt the episodes but fell to 0.0
on addition and sorting (the long tool conversations took most tokens); continuing `sft_tiny`
keeps them (held-out 0.13 / 0.53) and reaches 0.8 on the episodes
(experiments/benchmarks/RESULTS.md)."""

from pathlib import Path

from glm_jax.data import tasks

from configs import sft_tiny


def get_config(steps: str = "100"):
    config = sft_tiny.get_config(steps)
    config.workdir = "workdir/sft_tiny_agentic"
    config.init = "workdir/sft_tiny"
    config.init_sft_config = str(Path(__file__).with_name("sft_tiny.py"))
    config.sft.kinds = ",".join(tasks.KINDS)
    config.seq_len = 320  # a whole episode: ~200 prompt tokens (the tool list) + ~80
    config.warmup_steps = 10
    config.peak_learning_rate = 3e-3
    config.floor_learning_rate = 3e-4
    config.eval.max_new_tokens = 96  # a thinking episode is ~80 tokens
    return config
