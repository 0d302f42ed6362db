"""Plain-jnp GLM-4.5 / DeepSeek-V3 "noaux_tc" router (sigmoid + group-limited top-k)."""

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def route(
    logits: Array,
    bias: Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[Array, Array, Array]:
    """Top-k experts per token: logits [T, E], bias [E] ->
    (weights [T, k] f32, expert_ids [T, k] i32, tokens_per_expert [E] i32).

    Mirrors transformers' Glm4MoeTopkRouter. The bias only steers selection;
    weights are the unbiased sigmoid scores of the chosen experts. Ties go to
    the lowest group / expert index (``lax.top_k``); expert ids come in
    descending biased-score order.
    """
    num_tokens, num_experts = logits.shape
    group_size = num_experts // n_group
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))  # [T, E]
    choice = scores + bias.astype(jnp.float32)  # [T, E]

    grouped = choice.reshape(num_tokens, n_group, group_size)  # [T, n_group, E/n_group]
    # Group score = sum of its best two experts (its only expert if it has one).
    group_scores = lax.top_k(grouped, min(2, group_size))[0].sum(-1)  # [T, n_group]
    kept_groups = lax.top_k(group_scores, topk_group)[1]  # [T, topk_group]
    group_kept = (kept_groups[:, :, None] == jnp.arange(n_group)).any(1)  # [T, n_group]
    expert_kept = jnp.repeat(group_kept, group_size, axis=1)  # [T, E]
    choice = jnp.where(expert_kept, choice, -jnp.inf)

    expert_ids = lax.top_k(choice, top_k)[1].astype(jnp.int32)  # [T, k]
    return replay_route(logits, expert_ids, norm_topk_prob=norm_topk_prob,
                        routed_scaling_factor=routed_scaling_factor)


def replay_route(
    logits: Array, expert_ids: Array, *, norm_topk_prob: bool, routed_scaling_factor: float
) -> tuple[Array, Array, Array]:
    """The router's output for a given choice of experts: logits [T, E], expert_ids [T, k] ->
    (weights [T, k] f32, expert_ids, tokens_per_expert [E] i32). The weights are the chosen
    experts' sigmoid scores (renormalised, scaled), differentiable in the logits: what routing
    replay trains with when the selection was made by the rollout."""
    expert_ids = expert_ids.astype(jnp.int32)
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    weights = jnp.take_along_axis(scores, expert_ids, axis=1)  # [T, k]
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * routed_scaling_factor
    tokens_per_expert = jnp.bincount(expert_ids.ravel(), length=logits.shape[1]).astype(jnp.int32)
    return weights, expert_ids, tokens_per_expert
