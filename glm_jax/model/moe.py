"""The MoE block: sigmoid router with the loss-free balancing bias, dropless routed experts
(sort token copies by expert, grouped matmuls, un-sort, weighted sum) and ungated shared experts.

Under expert parallelism (`_moe_sharded`) each device runs its local copies through a static
buffer of `ep_capacity` rows (`ModelConfig.ep_capacity_factor` x the balanced share) rather than
through all T*k copies; copies past the buffer go through further passes of the same size
(skipped by `lax.cond` when empty, recomputed in the backward), so nothing is ever dropped.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import kernels
from glm_jax.config import ModelConfig
from glm_jax.model.layers import MLP, normal_param
from glm_jax.sharding import logical_spec

# Expert parallelism: each device's dispatch buffer holds ceil(cfg.ep_capacity_factor * T*k /
# n_expert) sorted local copies (rounded up to a multiple of _CAPACITY_MULTIPLE), T*k being the
# token copies the device routes. Skewed routing costs extra passes, never dropped tokens.
_CAPACITY_MULTIPLE = 8


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: float32 per-expert bias used only to select experts. Not an
    `nnx.Param`, so optimizers (which filter on Param) never touch it; the loss-free balancing
    update sets it from expert loads."""


class MoeStats(NamedTuple):
    tokens_per_expert: jax.Array  # [E] int32: routed token copies per expert in this batch
    seq_aux_loss: jax.Array  # [] float32: DeepSeek-V3 sequence-wise balance loss (unweighted)
    expert_ids: jax.Array  # [B, S, k] int32: each token's selected experts (routing replay)


class Router(nnx.Module):
    """The router's weights; `routed_experts` computes its float32 logits and the routing."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (config.hidden_size, config.n_routed_experts),
                                   ("embed", "experts"), config)
        self.e_score_correction_bias = RouterBias(
            jnp.zeros((config.n_routed_experts,), jnp.float32), logical_axes=("experts",))


class Experts(nnx.Module):
    """Routed experts stored stacked: gate/up [E, H, F], down [E, F, H]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, h, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), config)
        self.up_proj = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), config)
        self.down_proj = normal_param(rngs, (e, f, h), ("experts", "expert_mlp", "embed"), config)


def swiglu_experts(x_mh, group_sizes, gate, up, down, dtype):
    """x_mh [M, H]: token copies sorted by expert; group_sizes [G]; gate/up [G, H, F],
    down [G, F, H] -> [M, H]. Rows past sum(group_sizes) come out zero."""
    x = x_mh.astype(dtype)
    g = kernels.gmm(x, gate.astype(dtype), group_sizes)
    u = kernels.gmm(x, up.astype(dtype), group_sizes)
    return kernels.gmm(jax.nn.silu(g) * u, down.astype(dtype), group_sizes)


def _route(x_th, router, bias, cfg: ModelConfig, replay_ids=None):
    """-> (router logits [T, E] float32, weights [T, k], expert ids [T, k], tokens_per_expert
    [E]). `replay_ids` [T, k] (routing replay): use these experts instead of choosing; the
    weights still come from the current router's scores, so the router keeps its gradient."""
    logits = x_th.astype(jnp.float32) @ router.astype(jnp.float32)  # [T, E], always float32
    if replay_ids is None:
        weights, expert_ids, tokens_per_expert = kernels.route(
            logits, bias, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)
    else:
        weights, expert_ids, tokens_per_expert = kernels.replay_route(
            logits, replay_ids, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)
    return logits, weights, expert_ids, tokens_per_expert


def routed_experts(x_th, router, bias, gate, up, down, cfg: ModelConfig, first_expert=0,
                   replay_ids=None):
    """Routes every token over all E experts, runs the copies that go to the experts held here
    (`gate.shape[0]` of them, from `first_expert` on) and sums them weighted per token.
    `replay_ids` [T, k]: routing replay (see `_route`). All T*k copies are sorted and run (the
    single-device path; expert parallelism uses `routed_experts_buffered`).
    -> (out [T, H] float32, router logits [T, E], expert ids [T, k], tokens_per_expert [E])."""
    logits, weights, expert_ids, tokens_per_expert = _route(x_th, router, bias, cfg, replay_ids)
    num_local = gate.shape[0]
    perm, local_weights = _sort_local(expert_ids, weights, first_expert, num_local)
    y_sorted = swiglu_experts(x_th[perm.token_index], perm.group_sizes[:num_local], gate, up, down,
                              cfg.jnp_dtype)  # [T*k, H]
    y_tkh = kernels.unsort(y_sorted, perm.order, cfg.num_experts_per_tok)
    out = jnp.einsum("tkh,tk->th", y_tkh.astype(jnp.float32), local_weights)
    return out, logits, expert_ids, tokens_per_expert


def _sort_local(expert_ids, weights, first_expert, num_local):
    """Sorts the T*k copies by expert, the `num_local` experts held here (from `first_expert`
    on) first. Copies for experts held elsewhere sort into one extra group past the local ones,
    which the grouped matmuls skip (rows past sum(group_sizes) are zero).
    -> (ExpertSort over num_local + 1 groups, weights [T, k] zeroed for non-local copies)."""
    local_ids = expert_ids - first_expert
    here = (local_ids >= 0) & (local_ids < num_local)
    perm = kernels.sort_by_expert(jnp.where(here, local_ids, num_local), num_local + 1)
    return perm, jnp.where(here, weights, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _weighted_rows(y, w, dtype):
    """(y [C, H] * w [C] in float32) in `dtype`. Its backward keeps y as it came (16-bit) for
    w's gradient, not the float32 copy that autodiff of the product would store ([C, H]: 0.8
    GiB a dispatch pass for GLM-4.5 at 4,096 tokens x 8 expert devices)."""
    return (y.astype(jnp.float32) * w[:, None]).astype(dtype)


def _weighted_rows_fwd(y, w, dtype):
    return _weighted_rows(y, w, dtype), (y, w)


def _weighted_rows_bwd(dtype, res, ct):
    y, w = res
    ct = ct.astype(jnp.float32)
    return ((ct * w[:, None]).astype(y.dtype),
            jnp.sum(ct * y.astype(jnp.float32), axis=-1).astype(w.dtype))


_weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def ep_capacity(num_copies: int, n_expert: int, capacity_factor: float) -> int:
    """Rows of one dispatch pass: ceil(capacity_factor * num_copies / n_expert), rounded up to a
    multiple of 8, at most num_copies (then one pass holds every copy)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    rows = math.ceil(capacity_factor * num_copies / n_expert)
    rows = -(-rows // _CAPACITY_MULTIPLE) * _CAPACITY_MULTIPLE
    return max(1, min(rows, num_copies))


def routed_experts_buffered(x_th, weights, expert_ids, gate, up, down, cfg: ModelConfig,
                            first_expert, *, capacity: int):
    """The routed experts of tokens already routed (`weights`, `expert_ids` [T, k], as `_route`
    gives them), with the dispatch memory bounded by `capacity` rows, still dropless.

    The copies routed to the experts held here are sorted by expert (`kernels.sort_by_expert`;
    the others sort past them and are never gathered). Pass p runs the sorted local rows
    [p C, (p + 1) C) through the grouped matmuls as one [C, H] buffer (each expert's group
    clipped to the window) and scatter-adds the weighted results into out [T, H], in the
    dtype of `x_th` (as transformers combines its experts: in the hidden dtype; the expert
    parallel combine that follows sums in the compute dtype anyway).
    There are ceil(T*k / C) passes, enough for every copy even when all of them are local;
    `_dispatch_passes` runs them (pass 0 keeping its activations, the overflow passes
    recomputed in the backward). -> out [T, H] in `x_th`'s dtype."""
    k = cfg.num_experts_per_tok
    num_local = gate.shape[0]
    perm, local_weights = _sort_local(expert_ids, weights, first_expert, num_local)
    n = x_th.shape[0] * k
    pad = -(-n // capacity) * capacity - n  # so every pass's window lies inside the arrays
    token_index = jnp.pad(perm.token_index, (0, pad))  # [P*C] source token of each sorted row
    w_sorted = jnp.pad(local_weights.reshape(-1)[perm.order], (0, pad))  # [P*C]
    ends = jnp.cumsum(perm.group_sizes[:num_local])  # [G] one past each local group's rows
    return _dispatch_passes(x_th.astype(cfg.jnp_dtype), w_sorted, gate, up, down, token_index,
                            ends - perm.group_sizes[:num_local], ends, cfg, capacity)


def _window(p, token_index, w_sorted, starts, ends, capacity):
    """Pass p's [C] source tokens, [C] weights and [G] group sizes (clipped to its rows)."""
    lo = p * capacity
    gs = jnp.clip(ends, lo, lo + capacity) - jnp.clip(starts, lo, lo + capacity)
    return (lax.dynamic_slice_in_dim(token_index, lo, capacity),
            lax.dynamic_slice_in_dim(w_sorted, lo, capacity), gs.astype(jnp.int32))


def _run_pass(x, w_row, gate, up, down, *, tok, gs, cfg):
    """One pass: rows x[tok] through the experts, weighted -> [C, H] in x's dtype."""
    y = swiglu_experts(x[tok], gs, gate, up, down, cfg.jnp_dtype)  # rows past sum(gs): 0
    return _weighted_rows(y, w_row, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _dispatch_passes(x, w_sorted, gate, up, down, token_index, starts, ends, cfg, capacity):
    """out [T, H] = the sum over passes of each pass's weighted outputs, scattered to tokens.

    Pass 0 always runs and keeps its activations (C rows). The overflow passes run in a
    `lax.scan`, each under `lax.cond` (skipped once the local rows are used up), and keep
    nothing: the backward recomputes one at a time. A custom VJP orders that backward: pass
    0's first, so its activations are freed before any overflow pass is recomputed, then
    each overflow pass adds its gradients into pass 0's. Under plain autodiff the compiler
    was free to run the overflow passes' backward first, holding pass 0's activations, their
    recomputed ones and two sets of expert gradients at once (XLA:CPU's peak for GLM-4.5)."""
    return _dispatch_fwd(x, w_sorted, gate, up, down, token_index, starts, ends, cfg,
                         capacity)[0]


def _dispatch_fwd(x, w_sorted, gate, up, down, token_index, starts, ends, cfg, capacity):
    t, h = x.shape
    passes = token_index.shape[0] // capacity
    tok, w_row, gs = _window(0, token_index, w_sorted, starts, ends, capacity)
    y, pass0_vjp = jax.vjp(functools.partial(_run_pass, tok=tok, gs=gs, cfg=cfg),
                           x, w_row, gate, up, down)
    out = jnp.zeros((t, h), x.dtype).at[tok].add(y)
    if passes > 1:
        def step(out, p):
            tok, w_row, gs = _window(p, token_index, w_sorted, starts, ends, capacity)
            y = lax.cond(p * capacity < ends[-1],
                         lambda: _run_pass(x, w_row, gate, up, down, tok=tok, gs=gs, cfg=cfg),
                         lambda: jnp.zeros((capacity, h), x.dtype))
            return out.at[tok].add(y), None

        out, _ = lax.scan(step, out, jnp.arange(1, passes, dtype=jnp.int32))
    return out, (pass0_vjp, x, w_sorted, gate, up, down, token_index, starts, ends)


def _dispatch_bwd(cfg, capacity, res, ct):
    pass0_vjp, x, w_sorted, gate, up, down, token_index, starts, ends = res
    passes = token_index.shape[0] // capacity
    tok, _, _ = _window(0, token_index, w_sorted, starts, ends, capacity)
    dx, dw_row, dgate, dup, ddown = pass0_vjp(ct[tok])
    dw_sorted = lax.dynamic_update_slice_in_dim(jnp.zeros_like(w_sorted), dw_row, 0, 0)
    grads = (dx, dw_sorted, dgate, dup, ddown)
    if passes > 1:
        def step(grads, p):
            tok, w_row, gs = _window(p, token_index, w_sorted, starts, ends, capacity)

            def run():
                run_pass = functools.partial(_run_pass, tok=tok, gs=gs, cfg=cfg)
                return jax.vjp(run_pass, x, w_row, gate, up, down)[1](ct[tok])

            def skip():
                return (jnp.zeros_like(x), jnp.zeros_like(w_row), jnp.zeros_like(gate),
                        jnp.zeros_like(up), jnp.zeros_like(down))

            d = lax.cond(p * capacity < ends[-1], run, skip)
            dx, dw_sorted, dgate, dup, ddown = grads
            dw_sorted = lax.dynamic_update_slice_in_dim(dw_sorted, d[1], p * capacity, 0)
            return (dx + d[0], dw_sorted, dgate + d[2], dup + d[3], ddown + d[4]), None

        grads, _ = lax.scan(step, grads, jnp.arange(1, passes, dtype=jnp.int32))
    return (*grads, None, None, None)


_dispatch_passes.defvjp(_dispatch_fwd, _dispatch_bwd)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                config=config, rngs=rngs)
            if config.n_shared_experts else None)

    def __call__(self, x_bsh, replay_ids=None) -> tuple[jax.Array, MoeStats]:
        """`replay_ids` [B, S, k]: routing replay (see `routed_experts`)."""
        weights = (self.gate.kernel[...], self.gate.e_score_correction_bias[...],
                   self.experts.gate_proj[...], self.experts.up_proj[...],
                   self.experts.down_proj[...])
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            out, stats = _moe_local(x_bsh, *weights, replay_ids, cfg=self.config)
        else:
            out, stats = _moe_sharded(x_bsh, *weights, replay_ids, cfg=self.config, mesh=mesh)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_bsh)
        return out, stats


def _moe_local(x_bsh, router, bias, gate, up, down, replay_ids, *, cfg):
    b, s, h = x_bsh.shape
    replay = None if replay_ids is None else replay_ids.reshape(b * s, -1)
    out, logits, ids, counts = routed_experts(x_bsh.reshape(b * s, h), router, bias, gate, up,
                                              down, cfg, replay_ids=replay)
    ids = ids.reshape(b, s, -1)
    aux = sequence_aux_loss(logits.reshape(b, s, -1), ids)
    return out.reshape(b, s, h).astype(x_bsh.dtype), MoeStats(counts, aux, ids)


def _moe_sharded(x_bsh, router, bias, gate, up, down, replay_ids, *, cfg, mesh):
    """Expert parallelism with shard_map: each device holds E / n_expert experts (and a 1 /
    n_tensor slice of their width). Each device routes its own tokens (split over the data
    axes); tokens and their routing are all-gathered along `expert`, each device runs the
    copies routed to its own experts through a buffer of `ep_capacity` rows
    (`routed_experts_buffered`: further passes for any overflow, so dropless), and a
    reduce-scatter along `expert` (plus a sum over `tensor`), in the compute dtype when that is
    16-bit, returns every token's combined output to its owner. Expert loads are summed over
    the mesh. The buffer holds `cfg.ep_capacity_factor` x the balanced share. Expert weights
    split along `embed` (FSDP) are gathered inside, once cast to the compute dtype, and their
    gradients reduce-scattered there in that dtype."""
    n_expert, n_tensor = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    data_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    batch_axes = data_axes + (("expert",) if n_expert > 1 else ())
    b, s, h = x_bsh.shape
    k = cfg.num_experts_per_tok
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    tokens_split = b % n_batch == 0  # else (e.g. decoding one sequence) every device sees all
    x_spec = P(batch_axes if tokens_split else None, None, None)
    expert_axis = "expert" if n_expert > 1 else None
    tensor_axis = "tensor" if n_tensor > 1 else None
    gather_tokens = tokens_split and expert_axis is not None
    comm_dtype = cfg.jnp_dtype if jnp.dtype(cfg.jnp_dtype).itemsize < 4 else jnp.float32

    # The experts' FSDP split of `embed` (as `sharding.RULES` stores them) enters the shard_map
    # as it is, and each layer gathers it inside, in the compute dtype: the backward then
    # reduce-scatters the weight gradients in that dtype, and no compiler is left to choose a
    # layout for a gather of the whole stacked parameter.
    embed_axes = logical_spec(("experts", "embed", "expert_mlp"), gate.shape, mesh)[1]

    def gather_embed(w, axis):
        return w if embed_axes is None else jax.lax.all_gather(w, embed_axes, axis=axis,
                                                               tiled=True)

    def gather_expert(a):  # the expert group's tokens (or their routing), in order
        return jax.lax.all_gather(a, expert_axis, axis=0, tiled=True) if gather_tokens else a

    def local(x, router, bias, gate, up, down, replay):
        own = x.shape[0]
        gate, up, down = gather_embed(gate, 1), gather_embed(up, 1), gather_embed(down, 2)
        # Routing first, on this device's own rows only (the router's float32 product
        # included), then the routing is gathered with the tokens.
        replay = None if replay is None else replay.reshape(own * s, k)
        logits, weights, ids, counts = _route(x.reshape(own * s, h), router, bias, cfg, replay)
        aux = sequence_aux_loss(logits.reshape(own, s, -1), ids.reshape(own, s, k))
        xs = gather_expert(x.astype(comm_dtype))  # in the compute dtype when it is 16-bit
        bl = xs.shape[0]
        first = jax.lax.axis_index(expert_axis) * gate.shape[0] if expert_axis else 0
        capacity = ep_capacity(bl * s * k, n_expert, cfg.ep_capacity_factor)
        out = routed_experts_buffered(xs.reshape(bl * s, h), gather_expert(weights),
                                      gather_expert(ids), gate, up, down, cfg, first,
                                      capacity=capacity)
        # The collectives below move the compute dtype when it is 16-bit, not float32.
        out = out.reshape(bl, s, h).astype(comm_dtype)
        if tensor_axis:
            out = jax.lax.psum(out, tensor_axis)
        if expert_axis:
            out = (jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
                   if tokens_split else jax.lax.psum(out, expert_axis))
        if tokens_split and batch_axes:
            counts = jax.lax.psum(counts, batch_axes)
            aux = jax.lax.pmean(aux, batch_axes)
        return out.astype(x_bsh.dtype), counts, aux, ids.reshape(own, s, k)

    weight_spec = P(expert_axis, embed_axes, tensor_axis)
    out, counts, aux, ids = jax.shard_map(
        local, mesh=mesh,
        in_specs=(x_spec, P(), P(), weight_spec, weight_spec,
                  P(expert_axis, tensor_axis, embed_axes),
                  P() if replay_ids is None else x_spec),
        out_specs=(x_spec, P(), P(), x_spec), check_vma=False,
    )(x_bsh, router, bias, *(w.astype(cfg.jnp_dtype) for w in (gate, up, down)), replay_ids)
    return out, MoeStats(counts, aux, ids)


def sequence_aux_loss(logits_bse, expert_ids_bsk):
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i * P_i, averaged over sequences:
    f_i = E / (k S) * #(tokens of the sequence routed to i), P_i = mean_t of the token's sigmoid
    scores normalised to sum 1. Equals 1 when routing is perfectly uniform."""
    _, s, e = logits_bse.shape
    k = expert_ids_bsk.shape[-1]
    scores = jax.nn.sigmoid(logits_bse)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    counts = jnp.sum(jax.nn.one_hot(expert_ids_bsk, e, dtype=jnp.float32), axis=(1, 2))  # [B, E]
    f = counts * (e / (k * s))
    p = jnp.mean(probs, axis=1)  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))
