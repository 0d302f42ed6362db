"""The MoE block: sigmoid router with the loss-free balancing bias, dropless routed experts
(sort token copies by expert, grouped matmuls, un-sort, weighted sum) and ungated shared experts."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import kernels
from glm_jax.config import ModelConfig
from glm_jax.model.layers import MLP, normal_param


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: float32 per-expert bias used only to select experts. Not an
    `nnx.Param`, so optimizers (which filter on Param) never touch it; the loss-free balancing
    update sets it from expert loads."""


class MoeStats(NamedTuple):
    tokens_per_expert: jax.Array  # [E] int32: routed token copies per expert in this batch
    seq_aux_loss: jax.Array  # [] float32: DeepSeek-V3 sequence-wise balance loss (unweighted)


class Router(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (config.hidden_size, config.n_routed_experts),
                                   ("embed", "experts"), config)
        self.e_score_correction_bias = RouterBias(
            jnp.zeros((config.n_routed_experts,), jnp.float32), logical_axes=("experts",))

    def __call__(self, x_th):  # [T, H] -> router logits [T, E], always float32
        return x_th.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)


class Experts(nnx.Module):
    """Routed experts stored stacked: gate/up [E, H, F], down [E, F, H]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        e, h, f = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_proj = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), config)
        self.up_proj = normal_param(rngs, (e, h, f), ("experts", "embed", "expert_mlp"), config)
        self.down_proj = normal_param(rngs, (e, f, h), ("experts", "expert_mlp", "embed"), config)
        self.dtype = config.jnp_dtype

    def __call__(self, x_mh, group_sizes):
        """x_mh [M, H]: token copies sorted by expert; group_sizes [E] -> [M, H]."""
        x = x_mh.astype(self.dtype)
        gate = kernels.gmm(x, self.gate_proj[...].astype(self.dtype), group_sizes)
        up = kernels.gmm(x, self.up_proj[...].astype(self.dtype), group_sizes)
        return kernels.gmm(jax.nn.silu(gate) * up, self.down_proj[...].astype(self.dtype),
                           group_sizes)


class MoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.gate = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                config=config, rngs=rngs)
            if config.n_shared_experts else None)

    def __call__(self, x_bsh) -> tuple[jax.Array, MoeStats]:
        cfg = self.config
        b, s, h = x_bsh.shape
        k = cfg.num_experts_per_tok
        x_th = x_bsh.reshape(b * s, h)
        logits = self.gate(x_th)  # [T, E] float32
        weights, expert_ids, tokens_per_expert = kernels.route(
            logits, self.gate.e_score_correction_bias[...], top_k=k, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)
        perm = kernels.sort_by_expert(expert_ids, cfg.n_routed_experts)
        y_sorted = self.experts(x_th[perm.token_index], perm.group_sizes)  # [T*k, H]
        y_tkh = kernels.unsort(y_sorted, perm.order, k)
        out = jnp.einsum("tkh,tk->th", y_tkh.astype(jnp.float32), weights).astype(x_bsh.dtype)
        out = out.reshape(b, s, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_bsh)
        aux = sequence_aux_loss(logits.reshape(b, s, -1), expert_ids.reshape(b, s, k))
        return out, MoeStats(tokens_per_expert, aux)


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
