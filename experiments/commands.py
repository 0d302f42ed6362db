"""The launcher's commands; each takes the parsed absl flags."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, load_hf


def demo(flags) -> None:
    """Random `tiny` model: greedy decoding by re-running the causal forward on a fixed-size
    buffer (one compilation; the KV-cache engine lives in glm_jax.infer)."""
    config = ModelConfig.preset("tiny")
    model = GlmMoeModel(config, rngs=nnx.Rngs(flags.seed))
    counts = config.param_counts()
    print(f"tiny GLM-4.5-style MoE: {counts['total']:,} parameters, {counts['active']:,} active")
    prompt = 8
    ids = jax.random.randint(jax.random.key(flags.seed), (1, prompt), 0, config.vocab_size)
    ids = jnp.pad(ids, ((0, 0), (0, flags.steps)))

    @nnx.jit
    def step(model, ids, t):  # tokens after t do not influence logits at t (causal)
        token = jnp.argmax(model(ids)[:, t - 1], axis=-1)
        return ids.at[:, t].set(token)

    start = time.perf_counter()
    for t in range(prompt, prompt + flags.steps):
        ids = step(model, ids, t)
    print(f"prompt {ids[0, :prompt].tolist()} -> greedy {ids[0, prompt:].tolist()} "
          f"({time.perf_counter() - start:.2f}s)")


def convert(flags) -> None:
    """Loads a Hugging Face checkpoint (a strict check of every tensor) and summarises it."""
    if not flags.checkpoint:
        raise ValueError("convert needs --checkpoint=DIR")
    model = load_hf(flags.checkpoint)
    counts = model.config.param_counts()
    print(model.config)
    print(f"loaded {counts['total']:,} parameters ({counts['active']:,} active per token)")


COMMANDS = {"demo": demo, "convert": convert}
