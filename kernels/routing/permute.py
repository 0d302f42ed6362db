"""Grouping token copies by expert (for gmm) and putting them back."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class ExpertSort(NamedTuple):
    """How the T*k (token, slot) copies are laid out expert by expert."""

    order: Array  # [T*k] flat (token*k + slot) index of each sorted row
    token_index: Array  # [T*k] source token of each sorted row (order // k)
    group_sizes: Array  # [E] int32 rows per expert, the gmm group sizes


def sort_by_expert(expert_ids: Array, num_experts: int) -> ExpertSort:
    """Stable sort of expert_ids [T, k]: rows grouped by expert, ties in token order."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return ExpertSort(order, order // k, group_sizes)


def unsort(y_sorted: Array, order: Array, k: int) -> Array:
    """y_sorted [T*k, D] in expert order -> [T, k, D] in (token, slot) order.

    A gather through the inverse permutation (built by one integer scatter),
    so the gradient is a plain gather-transpose and no float scatter is used.
    """
    n, d = y_sorted.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))  # [T*k]
    return y_sorted[inverse].reshape(n // k, k, d)
