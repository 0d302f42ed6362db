"""Auxiliary-loss-free load balancing (arXiv 2408.15664) and the MaxVio balance metric.

After every optimizer step each MoE layer's `e_score_correction_bias` moves by
`u * sign(mean_load - load)`: overloaded experts become less likely to be selected, underloaded
ones more. Loads are the step's token counts over the whole global batch, so the update is
outside the gradient and identical on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def max_violation(tokens_per_expert):
    """MaxVio per layer: (max_i load_i - mean load) / mean load. [..., E] -> [...]."""
    load = tokens_per_expert.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)


def balance_bias_update(bias, tokens_per_expert, rate):
    """bias [..., E] float32 + rate * sign(mean_load - load), per layer."""
    load = tokens_per_expert.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - load)


def bias_update_rate(step, *, rate: float, stop_step: int | None):
    """u until `stop_step` (the report sets u = 0 after the first 15T tokens), then 0."""
    if stop_step is None:
        return jnp.float32(rate)
    return jnp.where(step < stop_step, jnp.float32(rate), jnp.float32(0.0))


def update_router_biases(buffers: nnx.State, loads: dict[str, jax.Array], rate) -> nnx.State:
    """Moves every RouterBias in `buffers` (the model's non-Param state) by its layers' loads.
    `loads` maps the owning stack, "moe_layers" ([L, E] counts) or "mtp" ([E]), to the counts."""
    flat = []
    for path, variable in nnx.to_flat_state(buffers):
        if path[-1] == "e_score_correction_bias" and path[0] in loads:
            variable = variable.replace(balance_bias_update(variable[...], loads[path[0]], rate))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)
