"""Gradient clipping by global norm, done by the training steps themselves."""

from __future__ import annotations

import jax
import optax


def clip_by_global_norm(grads, max_norm: float):
    """-> (grads scaled down to global norm `max_norm` when above it, their norm before).

    `optax.clip_by_global_norm`'s arithmetic (`max_norm` 0: no clipping), written out so that
    the norm, which the step also reports, is taken once. Applied by the step where the
    gradients are made, not as the optimizer's first transformation. Inside the optimizer,
    which the step runs under a `lax.cond` (a skipped step leaves the state as it was), the
    clipped gradients are a second whole set beside the cond's operands; here the scaling
    fuses into the conversion that makes them (the TPU plan of `pretrain_glm45`:
    experiments/benchmarks/RESULTS.md)."""
    norm = optax.tree.norm(grads)
    if not max_norm:
        return grads, norm
    keep = norm < max_norm
    return jax.tree.map(lambda g: jax.lax.select(keep, g, g / norm.astype(g.dtype) * max_norm),
                        grads), norm
