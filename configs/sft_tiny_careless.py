"""`sft_tiny` taught by a careless teacher: half of the sorting demonstrations list the numbers
in descending order (`sft.flawed_fraction`, `glm_jax.data.tasks.flawed`), the rest is as in
`sft_tiny`. The starting policy of `grpo_tiny.py`: a systematic mistake in the SFT data, the kind
a verifiable reward can remove. `sft_tiny`'s own errors on sorting are copying errors (numbers
split by a 512-token BPE, read by a 3-layer model) that RL barely moves (RESULTS.md)."""

from configs import sft_tiny


def get_config(steps: str = "400"):
    config = sft_tiny.get_config(steps)
    config.workdir = "workdir/sft_tiny_careless"
    config.sft.flawed_fraction = 0.5
    return config
