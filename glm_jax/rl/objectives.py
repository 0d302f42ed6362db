"""GRPO's objectives as small pure functions, exactly as SPEC.md §4b writes them.

Shapes: `logp`, `old_logp`, `ref_logp`, `mask` are `[B, T]` over completion tokens (mask 1 on
tokens the policy generated; 0 on padding and on tool-response tokens); rewards `[N]` hold
groups as consecutive blocks of `group_size` completions of one prompt. The loss variants of
GRPO (GLM-4.5: no KL, eps 0.2 / 0.2), DAPO (clip-higher, token-mean, overlong shaping) and
Dr. GRPO (no std, `seq-mean-token-scale`) are choices of these functions' arguments.
"""

from __future__ import annotations

import jax.numpy as jnp

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-scale")


def group_advantages(rewards, group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> jnp.ndarray:
    """`[N]` rewards -> `[N]` float32 advantages `(r - mean_g) / (std_g + eps)`, std with
    ddof = 1 (a group of one: std 1); `scale_by_std=False` (Dr. GRPO): `r - mean_g`."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of "
                         f"{group_size}")
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if scale_by_std:
        std = (jnp.std(groups, axis=1, ddof=1, keepdims=True) if group_size > 1
               else jnp.ones_like(groups[:, :1]))
        centred = centred / (std + eps)
    return centred.reshape(-1)


def token_policy_loss(logp, old_logp, advantages, *, eps_low: float = 0.2,
                      eps_high: float = 0.2, clip_c: float | None = None) -> jnp.ndarray:
    """Per-token clipped surrogate `[B, T]`: `max(-A rho, -A clip(rho, 1 - eps_low,
    1 + eps_high))` with `rho = exp(clip(logp - old_logp, -20, 20))`; with `clip_c > 1` the dual
    clip `min(l, -c A)` where `A < 0`. `advantages`: `[B]` (broadcast over tokens) or `[B, T]`."""
    logp = jnp.asarray(logp, jnp.float32)
    advantages = jnp.asarray(advantages, jnp.float32)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    ratio = jnp.exp(jnp.clip(logp - jnp.asarray(old_logp, jnp.float32), -20.0, 20.0))
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(-advantages * ratio, -advantages * clipped)
    if clip_c is not None:
        if clip_c <= 1:
            raise ValueError(f"clip_c must be > 1, got {clip_c}")
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -clip_c * advantages), loss)
    return loss


def aggregate_loss(per_token, mask, mode: str) -> jnp.ndarray:
    """`[B, T]` per-token losses -> scalar, by `mode` (SPEC.md §4b); all-masked rows count as
    empty (no division by zero)."""
    per_token = jnp.asarray(per_token, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / jnp.maximum(mask.sum(), 1.0)
    if mode == "seq-mean-token-mean":
        counts = mask.sum(axis=1)
        has_tokens = counts > 0
        row_means = masked.sum(axis=1) / jnp.maximum(counts, 1.0)
        return jnp.where(has_tokens, row_means, 0.0).sum() / jnp.maximum(has_tokens.sum(), 1)
    if mode == "seq-mean-token-sum":
        return masked.sum(axis=1).mean()
    if mode == "seq-mean-token-scale":
        return masked.sum() / (per_token.shape[0] * per_token.shape[1])
    raise ValueError(f"aggregation mode must be one of {AGGREGATIONS}, got {mode!r}")


def k3_kl(logp, ref_logp) -> jnp.ndarray:
    """Per-token k3 estimator of KL(policy || reference): `exp(ref - logp) - (ref - logp) - 1`
    (>= 0, unbiased)."""
    delta = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    return jnp.exp(delta) - delta - 1.0


def overlong_penalty(lengths, *, max_len: int, cache_len: int) -> jnp.ndarray:
    """DAPO's soft overlong punishment `[B]`, lengths in tokens: 0 up to `max_len - cache_len`,
    then linear down to -1 at `max_len`, and -1 beyond."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    start = max_len - cache_len
    ramp = (start - lengths) / cache_len
    return jnp.where(lengths <= start, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))
