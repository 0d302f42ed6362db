"""Grouping token copies by expert (for gmm) and putting them back."""

from functools import partial
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


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def unsort(y_sorted: Array, order: Array, k: int) -> Array:
    """y_sorted [T*k, D] in expert order -> [T, k, D] in (token, slot) order.

    Both directions are gathers: forward through the inverse permutation (built by one integer
    scatter), backward through `order` itself (the transpose of a permutation gather is the
    gather by the inverse permutation), so no float scatter-add runs in either pass.
    """
    n, d = y_sorted.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))  # [T*k]
    return y_sorted[inverse].reshape(n // k, k, d)


def _unsort_fwd(y_sorted, order, k):
    return unsort(y_sorted, order, k), order


def _unsort_bwd(k, order, g_tkd):
    return g_tkd.reshape(order.shape[0], -1)[order], None


unsort.defvjp(_unsort_fwd, _unsort_bwd)
