"""Fused Pallas GLM-4.5 router: one pass over a [tT, E] tile of logits.

The reference router is a chain of small XLA ops (sigmoid, two ``top_k``s, a
gather, a normalisation), each a round trip through HBM. Here one kernel per
token tile does all of it in registers / VMEM: sigmoid, bias, group scores,
group mask, top-k as ``k`` rounds of argmax, gather of the unbiased scores,
normalise, scale. ``tokens_per_expert`` is a ``bincount`` of the ids outside
the kernel (cheap, and a cross-tile sum would need a second pass anyway).

Tie rule, same as ``reference.route`` (``lax.top_k``): every argmax (group or
expert) takes the lowest index among equal maxima, so expert ids come out in
descending biased-score order, ties lowest-id first, and tied groups keep the
lowest group ids. Interpreted (CPU), the kernel matches the reference
exactly in ids; compiled, Triton's sigmoid and division may round an ulp
differently from XLA's, so scores that tie to within an ulp may pick the
other expert.

Portability: only ops that both the Triton (GPU) and Mosaic (TPU) lowerings
support: elementwise math, ``where``, 2-D ``iota``, and max / min / sum
reductions along the last axis. No reshapes and no integer division: groups
are static column ranges, and argmax is "max, then min column index among the
maxima". Triton needs power-of-two block shapes, so the wrapper pads E and k
to powers of two (padded experts are in no group, so never kept) and T to a
tile multiple. The whole padded E is one block (256 for GLM-4.5's 160).

Weights are differentiable in the logits through a custom VJP that
recomputes them from the chosen ids in jnp (the ids, like ``lax.top_k``'s,
carry no gradient, so the bias gets none either).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.routing.reference import replay_route

Array = jax.Array

# Tokens per grid step. Small enough that Triton keeps the ~6 live [tT, 256]
# f32 arrays in registers with its default 4 warps; on TPU [32, 256] f32 is
# 8 vregs per array.
TOKEN_TILE = 32


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _argmax(x: Array, col: Array) -> tuple[Array, Array]:
    """Row max of ``x`` [tT, E] and its lowest column index, both [tT, 1]."""
    best = jnp.max(x, axis=1, keepdims=True)
    idx = jnp.min(jnp.where(x == best, col, x.shape[1]), axis=1, keepdims=True)
    return best, idx


def _kept_experts(choice: Array, col: Array, n_group: int, group_size: int,
                  topk_group: int) -> Array:
    """[tT, E] mask of experts in the ``topk_group`` groups with the best top-2 sums."""
    group_score = jnp.full_like(choice, -jnp.inf)  # each column holds its group's score
    for g in range(n_group):
        in_group = (col >= g * group_size) & (col < (g + 1) * group_size)
        members = jnp.where(in_group, choice, -jnp.inf)
        score, first = _argmax(members, col)
        if group_size > 1:  # add the runner-up (equal to the best if tied)
            score = score + jnp.max(jnp.where(col == first, -jnp.inf, members), axis=1,
                                    keepdims=True)
        group_score = jnp.where(in_group, score, group_score)
    kept = jnp.zeros(choice.shape, jnp.bool_)
    for _ in range(topk_group):
        # Scores are constant within a group, so the lowest column among the
        # maxima is the first column of the lowest-numbered best group.
        _, start = _argmax(group_score, col)
        winner = (col >= start) & (col < start + group_size)
        kept = kept | winner
        group_score = jnp.where(winner, -jnp.inf, group_score)
    return kept


def _route_kernel(logits_ref, bias_ref, weights_ref, ids_ref, *, num_experts: int,
                  top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                  routed_scaling_factor: float):
    scores = jax.nn.sigmoid(logits_ref[...].astype(jnp.float32))  # [tT, Ep]
    choice = scores + bias_ref[...]  # [tT, Ep]; the bias steers selection only
    col = lax.broadcasted_iota(jnp.int32, choice.shape, 1)
    if topk_group == n_group:  # every group kept (e.g. n_group == 1): skip group scores
        kept = col < num_experts
    else:
        kept = _kept_experts(choice, col, n_group, num_experts // n_group, topk_group)
    choice = jnp.where(kept, choice, -jnp.inf)  # -inf, so negative scores still win

    slot = lax.broadcasted_iota(jnp.int32, ids_ref.shape, 1)  # [tT, kp]
    ids = jnp.zeros(ids_ref.shape, jnp.int32)
    weights = jnp.zeros(weights_ref.shape, jnp.float32)
    for j in range(top_k):
        _, idx = _argmax(choice, col)
        hit = col == idx
        weight = jnp.sum(jnp.where(hit, scores, 0.0), axis=1, keepdims=True)  # gather
        ids = jnp.where(slot == j, idx, ids)
        weights = jnp.where(slot == j, weight, weights)
        choice = jnp.where(hit, -jnp.inf, choice)
    if norm_topk_prob:  # padded slots hold 0, so they do not change the sum
        weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + 1e-20)
    weights_ref[...] = weights * routed_scaling_factor
    ids_ref[...] = ids


def _fused_route(logits: Array, bias: Array, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float, token_tile: int,
                 interpret: bool) -> tuple[Array, Array]:
    """Pad to power-of-two / tile-multiple shapes, run the kernel, slice back."""
    num_tokens, num_experts = logits.shape
    tile = min(token_tile, max(16, _next_pow2(num_tokens)))  # 16: bf16's TPU sublane tile
    padded_tokens = -(-num_tokens // tile) * tile
    padded_experts, padded_k = _next_pow2(num_experts), _next_pow2(top_k)
    logits = jnp.pad(logits, ((0, padded_tokens - num_tokens), (0, padded_experts - num_experts)))
    bias = jnp.pad(bias.astype(jnp.float32), (0, padded_experts - num_experts))[None]
    kernel = partial(
        _route_kernel, num_experts=num_experts, top_k=top_k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
    )
    out_spec = pl.BlockSpec((tile, padded_k), lambda i: (i, 0))
    weights, ids = pl.pallas_call(
        kernel,
        grid=(padded_tokens // tile,),
        in_specs=[
            pl.BlockSpec((tile, padded_experts), lambda i: (i, 0)),
            pl.BlockSpec((1, padded_experts), lambda i: (0, 0)),
        ],
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((padded_tokens, padded_k), jnp.float32),
            jax.ShapeDtypeStruct((padded_tokens, padded_k), jnp.int32),
        ],
        interpret=interpret,
    )(logits, bias)
    return weights[:num_tokens, :top_k], ids[:num_tokens, :top_k]


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _differentiable_route(logits, bias, *config):
    return _fused_route(logits, bias, *config)


def _route_fwd(logits, bias, *config):
    weights, ids = _fused_route(logits, bias, *config)
    return (weights, ids), (logits, bias, ids)


def _route_bwd(top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor, token_tile,
               interpret, residuals, cotangents):
    logits, bias, ids = residuals
    _, vjp = jax.vjp(lambda lg: replay_route(lg, ids, norm_topk_prob=norm_topk_prob,
                                             routed_scaling_factor=routed_scaling_factor)[0],
                     logits)
    return (*vjp(cotangents[0]), jnp.zeros_like(bias))


_differentiable_route.defvjp(_route_fwd, _route_bwd)


def route(
    logits: Array,
    bias: Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    token_tile: int = TOKEN_TILE,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """Same contract and tie rule as ``reference.route``; see the module docstring.

    ``token_tile`` must be a power of two >= 16. ``interpret=None`` runs the
    Pallas interpreter on CPU (which has no Pallas lowering) and the compiled
    kernel elsewhere.
    """
    if token_tile < 16 or token_tile & (token_tile - 1):
        raise ValueError(f"route: token_tile={token_tile} must be a power of two >= 16")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    weights, ids = _differentiable_route(
        logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor,
        token_tile, interpret,
    )
    tokens_per_expert = jnp.bincount(ids.ravel(), length=logits.shape[1]).astype(jnp.int32)
    return weights, ids, tokens_per_expert
