"""MoE routing: top-k expert choice and the expert-major permutation.

The router is the jnp reference on every platform: the fused Pallas kernel it once had was
written on Pallas' deprecated Triton backend, and the router is a few elementwise ops and two
small top-ks over a [T, E] tile that XLA already fuses, so it was dropped rather than ported.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from kernels.backends import resolve
from kernels.routing import reference
from kernels.routing.permute import ExpertSort, sort_by_expert, unsort
from kernels.routing.reference import replay_route

Array = jax.Array

BACKENDS: dict[str, Callable[..., tuple[Array, Array, Array]]] = {
    "reference": reference.route,
}


def _auto_backend() -> str:
    """The one place that picks a routing backend per platform: the reference everywhere
    (see the module docstring)."""
    return "reference"


def _check_inputs(
    logits: Array, bias: Array, top_k: int, n_group: int, topk_group: int
) -> None:
    if logits.ndim != 2:
        raise ValueError(f"route: logits must be 2-D [T, E], got shape {logits.shape}")
    num_experts = logits.shape[1]
    if bias.shape != (num_experts,):
        raise ValueError(f"route: bias must have shape [E]=({num_experts},), got {bias.shape}")
    for name, x in (("logits", logits), ("bias", bias)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"route: {name} must be floating point, got {x.dtype}")
    if n_group < 1 or num_experts % n_group:
        raise ValueError(f"route: n_group={n_group} must divide the {num_experts} experts")
    if not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group={topk_group} must be in [1, n_group={n_group}]")
    kept = topk_group * (num_experts // n_group)
    if not 1 <= top_k <= kept:
        raise ValueError(
            f"route: top_k={top_k} must be in [1, {kept}] "
            f"(experts in the topk_group={topk_group} kept groups)"
        )


@partial(
    jax.jit,
    static_argnames=(
        "top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "backend"
    ),
)
def route(
    logits: Array,
    bias: Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    backend: str = "auto",
) -> tuple[Array, Array, Array]:
    """GLM-4.5 router: logits [T, E], bias [E] -> (weights [T, k] f32, expert_ids [T, k] i32,
    tokens_per_expert [E] i32).

    Same semantics as transformers' Glm4MoeTopkRouter (sigmoid scores, bias
    for selection only, keep the ``topk_group`` groups with the best top-2
    sums, top-k inside them, optional renormalisation, then scaling). Ties
    pick the lowest index, both for groups and for experts; expert ids are in
    descending biased-score order. See ``reference.route``.
    """
    _check_inputs(logits, bias, top_k, n_group, topk_group)
    name = resolve("route", backend, BACKENDS, _auto_backend)
    return BACKENDS[name](
        logits,
        bias,
        top_k=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
    )


__all__ = ["BACKENDS", "ExpertSort", "reference", "replay_route", "route", "sort_by_expert",
           "unsort"]
