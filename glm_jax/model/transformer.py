"""GlmMoeModel: embeddings, scanned decoder layers (dense first, then MoE), final norm, untied
lm_head, and the multi-token-prediction (MTP) layer.

Layers of each kind are stored stacked (a leading layer axis on every parameter) and run with one
`jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import ModelConfig
from glm_jax.errors import InputError
from glm_jax.model.attention import Attention, segment_mask
from glm_jax.model.cache import KVCache
from glm_jax.model.layers import MLP, Embed, Linear, RMSNorm, rope_cos_sin
from glm_jax.model.moe import MoE, MoeStats

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, S, V]
    hidden: jax.Array  # [B, S, H] final-norm output, what lm_head reads (and the MTP's input)
    # per MoE layer, stacked: tokens_per_expert [L, E], seq_aux_loss [L], expert_ids [L, B, S, k]
    moe_stats: MoeStats | None


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h)), mlp dense or MoE."""

    def __init__(self, config: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, config=config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, config=config)
        self.moe = moe
        self.mlp = (MoE(config, rngs=rngs) if moe else
                    MLP(config.hidden_size, config.intermediate_size, config=config, rngs=rngs))

    def __call__(self, x, cos, sin, mask, cache=None, replay_ids=None, segment_ids=None):
        """-> (x, MoeStats or None, updated kv cache or None); see Attention for `cache` and
        `segment_ids`, MoE for `replay_ids`."""
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, segment_ids)
        h = x + attn
        y = self.post_attention_layernorm(h)
        if self.moe:
            y, stats = self.mlp(y, replay_ids)
            return h + y, stats, kv
        return h + self.mlp(y), None, kv


def stacked_layers(config: ModelConfig, count: int, *, moe: bool, rngs: nnx.Rngs):
    """`count` DecoderLayers as one module whose parameters have a leading [count] axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return DecoderLayer(config, moe=moe, rngs=rngs)

    return make(rngs)


def rematerialised(fn, remat: str):
    """`fn` under jax.checkpoint with ModelConfig.remat's policy ("none": `fn` itself)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT[remat], prevent_cse=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gradient_port(stack, dtype):
    """Zeros shaped like the float32 `stack`, in `dtype`, through which `stack`'s gradient
    flows back: their cotangent, cast to float32, is `stack`'s."""
    return jnp.zeros(stack.shape, dtype)


def _gradient_port_fwd(stack, dtype):
    return _gradient_port(stack, dtype), None


def _gradient_port_bwd(dtype, _, ct):
    return (ct.astype(jnp.float32),)


_gradient_port.defvjp(_gradient_port_fwd, _gradient_port_bwd)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _expert_ports(state, dtype) -> list:
    """For each float32 routed-expert stack, when the compute dtype is 16-bit: zeros in that
    dtype that carry its gradient (else None), in `state`'s leaf order. The scan then takes
    each layer's expert weights as their float32 slice, cast, plus that layer's zeros, so its
    backward stacks their gradients in the compute dtype (of 16-bit matmuls: no digit is
    lost), half a float32 stack, and no cast copy of the whole parameter is kept beside it."""
    def port(path, variable):
        value = variable.get_value()  # an FP8 block-quantised matrix (and its scales) stays
        if (jnp.dtype(dtype).itemsize < 4 and isinstance(value, jax.Array)
                and value.dtype == jnp.float32
                and any(getattr(key, "key", None) == "experts" for key in path)):
            return _gradient_port(value, dtype)
        return None

    return [port(path, v) for path, v in
            jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]]


def _through_ports(state, ports, dtype):
    """One layer's state with each ported expert matrix cast to `dtype` plus its zeros: the
    float32 value itself carries no gradient, its port does. The cast rounds with
    `reduce_precision` first (the same bits as `astype` alone): the TPU compiler's bfloat16
    propagation would otherwise turn "every use casts" into one cast of the whole stacked
    parameter before the loop, a 16-bit copy kept through forward and backward (4.9 GiB per
    chip for GLM-4.5 at 128 chips)."""
    bits = jnp.finfo(dtype)
    leaves, treedef = jax.tree.flatten(state, is_leaf=_is_variable)
    leaves = [v if port is None else v.replace(jax.lax.reduce_precision(
        jax.lax.stop_gradient(v.get_value()), bits.nexp, bits.nmant).astype(dtype) + port)
              for v, port in zip(leaves, ports)]
    return jax.tree.unflatten(treedef, leaves)


def _cotangents_together(fn):
    """`fn(state, x)` whose backward hands back its weights' cotangents and x's at once, so a
    compiler cannot defer the weight gradients (and keep the buffers they read alive) until
    after the backward of whatever produced x."""
    @jax.custom_vjp
    def run(state, x):
        return fn(state, x)

    def run_fwd(state, x):
        return jax.vjp(fn, state, x)  # (output, the vjp as residual)

    def run_bwd(vjp, ct):
        return jax.lax.optimization_barrier(vjp(ct))

    run.defvjp(run_fwd, run_bwd)
    return run


def scan_layers(layers, x, cos, sin, mask, remat: str, cache=None, replay_ids=None,
                unroll: bool = False, segment_ids=None, compute_dtype=jnp.float32):
    """Runs stacked layers with lax.scan -> (x, per-layer stats, per-layer (k, v) or None),
    stacked on axis 0. `cache` = (k [L, B, T, K, D], v, index) for cached decoding;
    `replay_ids` [L, B, S, k] the experts each MoE layer must use (routing replay); `unroll`
    lays the layers out as straight-line code (ModelConfig.unroll_layers); `segment_ids` [B, S]
    those the mask was built from (see Attention); `compute_dtype` the dtype of the matmuls."""
    graphdef, state = nnx.split(layers)
    ports = _expert_ports(state, compute_dtype)

    def body(carry, xs):
        layer_state, ports, kv, replay = xs
        layer_state = _through_ports(layer_state, ports, compute_dtype)
        layer_cache = None if kv is None else (*kv, cache[2])
        x, stats, new_kv = nnx.merge(graphdef, layer_state)(carry, cos, sin, mask, layer_cache,
                                                            replay, segment_ids)
        return x, (stats, new_kv)

    body = rematerialised(body, remat)
    kv = None if cache is None else cache[:2]
    x, (stats, new_kv) = jax.lax.scan(body, x, (state, ports, kv, replay_ids), unroll=unroll)
    return x, stats, new_kv


class SharedHead(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.head = Linear(config.hidden_size, config.vocab_size, bias=False,
                           axes=("embed", "vocab"), config=config, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(x))


class MultiTokenPredictor(nnx.Module):
    """DeepSeek-V3-style MTP layer (stored as `model.layers.{num_hidden_layers}.*` on the Hub):
    logits(t+2) = shared_head(layer(eh_proj([enorm(embed(x[t+1])), hnorm(h[t])])))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, eps = config.hidden_size, config.rms_norm_eps
        self.embed_tokens = Embed(config.vocab_size, h, config=config, rngs=rngs)
        self.enorm = RMSNorm(h, eps=eps, config=config)
        self.hnorm = RMSNorm(h, eps=eps, config=config)
        self.eh_proj = Linear(2 * h, h, bias=False, axes=("mtp_concat", "embed"), config=config,
                              rngs=rngs)
        self.layer = DecoderLayer(config, moe=True, rngs=rngs)
        self.shared_head = SharedHead(config, rngs=rngs)

    def __call__(self, hidden, next_ids, cos, sin, mask, cache=None):
        """-> (logits, MoeStats, updated kv or None); `cache` as for Attention."""
        x, stats, kv = self.final_hidden(hidden, next_ids, cos, sin, mask, cache)
        return self.shared_head.head(x), stats, kv

    def final_hidden(self, hidden, next_ids, cos, sin, mask, cache=None, segment_ids=None,
                     remat: str = "none"):
        """As __call__, stopping before the shared head's projection: its input [B, S, H];
        `segment_ids` as for Attention; `remat` (ModelConfig.remat) rematerialises the decoder
        layer in the backward, as the main layers are (else its MoE buffers stay live)."""
        e = self.enorm(self.embed_tokens(next_ids))
        x = self.eh_proj(jnp.concatenate([e, self.hnorm(hidden).astype(e.dtype)], axis=-1))
        graphdef, state = nnx.split(self.layer)
        layer = rematerialised(
            lambda state, x: nnx.merge(graphdef, state)(x, cos, sin, mask, cache, None,
                                                        segment_ids), remat)
        x, stats, kv = _cotangents_together(layer)(state, x)
        return self.shared_head.norm(x), stats, kv


class GlmMoeModel(nnx.Module):
    """GLM-4.5 causal LM. `model(input_ids)` -> logits [B, S, V]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        h = config.hidden_size
        self.embed_tokens = Embed(config.vocab_size, h, config=config, rngs=rngs)
        k, m = config.first_k_dense_replace, config.num_moe_layers
        self.dense_layers = stacked_layers(config, k, moe=False, rngs=rngs) if k else None
        self.moe_layers = stacked_layers(config, m, moe=True, rngs=rngs) if m else None
        self.norm = RMSNorm(h, eps=config.rms_norm_eps, config=config)
        self.lm_head = Linear(h, config.vocab_size, bias=False, axes=("embed", "vocab"),
                              config=config, rngs=rngs)
        self.mtp = (MultiTokenPredictor(config, rngs=rngs)
                    if config.num_nextn_predict_layers else None)

    def __call__(self, input_ids, *, segment_ids=None, positions=None, attention_mask=None):
        return self.forward(input_ids, segment_ids=segment_ids, positions=positions,
                            attention_mask=attention_mask).logits

    def forward(self, input_ids, *, segment_ids=None, positions=None, attention_mask=None,
                routing=None) -> ModelOutput:
        """input_ids [B, S]. Packed rows: `segment_ids` [B, S] (attention never crosses a segment;
        positions default to restarting at each segment start). `attention_mask` [B, S] (1 = token,
        0 = padding) is the Hugging Face spelling of two segments and may replace segment_ids.
        `routing` [B, S, L, k] (routing replay): the experts every MoE layer uses for each token,
        e.g. those a rollout selected (`ModelOutput.moe_stats.expert_ids` moved to this layout);
        the router still weighs them, so it is trained."""
        chex.assert_rank(input_ids, 2)
        segment_ids, positions = resolve_segments(input_ids, segment_ids, positions, attention_mask)
        cos, sin = rope_cos_sin(positions, self.config, self.config.jnp_dtype)
        mask = segment_mask(segment_ids)
        replay_ids = None
        if routing is not None:
            expected = (*input_ids.shape, self.config.num_moe_layers,
                        self.config.num_experts_per_tok)
            if tuple(routing.shape) != expected:
                raise InputError(f"routing: expected shape [B, S, MoE layers, k] = {expected}, "
                                 f"got {tuple(routing.shape)}")
            replay_ids = jnp.moveaxis(jnp.asarray(routing, jnp.int32), 2, 0)  # [L, B, S, k]
        output, _ = self._run(input_ids, cos, sin, mask, None, replay_ids, segment_ids)
        return output

    def _run(self, input_ids, cos, sin, mask, cache: KVCache | None, replay_ids=None,
             segment_ids=None):
        x = self.embed_tokens(input_ids)
        stats, new_k, new_v = None, {}, {}
        for name in ("dense_layers", "moe_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            layer_cache = None if cache is None else (cache.k[name], cache.v[name], cache.length)
            x, layer_stats, kv = scan_layers(layers, x, cos, sin, mask, self.config.remat,
                                             layer_cache,
                                             replay_ids if name == "moe_layers" else None,
                                             unroll=self.config.unroll_layers,
                                             segment_ids=segment_ids,
                                             compute_dtype=self.config.jnp_dtype)
            if name == "moe_layers":
                stats = layer_stats
            if kv is not None:
                new_k[name], new_v[name] = kv
        x = self.norm(x)
        output = ModelOutput(logits=self.lm_head(x), hidden=x, moe_stats=stats)
        return output, (None if cache is None else cache.replace(k=new_k, v=new_v))

    def forward_cached(self, input_ids, cache: KVCache, *, valid=None
                       ) -> tuple[ModelOutput, KVCache]:
        """Runs `input_ids` [B, S] as the next S slots of `cache` (prefill: the prompt; decode:
        one token). `valid` [B, S] (default all True) marks real tokens; padding slots are never
        attended to and do not advance a row's positions, so left-padded prompts of different
        lengths decode exactly as if each ran alone."""
        chex.assert_rank(input_ids, 2)
        if valid is None:
            valid = jnp.ones(input_ids.shape, bool)
        cache, positions, mask = cache.advance(valid)
        cos, sin = rope_cos_sin(positions, self.config, self.config.jnp_dtype)
        output, cache = self._run(input_ids, cos, sin, mask, cache)
        return output, cache.replace(length=cache.length + input_ids.shape[1])

    def mtp_logits(self, hidden, next_ids, *, segment_ids=None, positions=None):
        """MTP logits [B, S, V]: row t predicts token t+2 from `hidden[:, t]` (the main model's
        final-norm output at t, `ModelOutput.hidden`, as vLLM, SGLang and Megatron feed it) and
        `next_ids[:, t]` (token t+1)."""
        logits, _ = self.mtp_forward(hidden, next_ids, segment_ids=segment_ids, positions=positions)
        return logits

    def mtp_forward(self, hidden, next_ids, *, segment_ids=None, positions=None):
        """As `mtp_logits`, also returning the MTP layer's MoeStats."""
        x, stats = self.mtp_hidden(hidden, next_ids, segment_ids=segment_ids, positions=positions)
        return self.mtp.shared_head.head(x), stats

    def mtp_hidden(self, hidden, next_ids, *, segment_ids=None, positions=None):
        """As `mtp_forward`, but the input of the projection `mtp.shared_head.head` [B, S, H]
        instead of logits, for a loss that projects a chunk at a time."""
        if self.mtp is None:
            raise InputError("this model has no MTP layer (config.num_nextn_predict_layers == 0, "
                             "e.g. a checkpoint saved by transformers)")
        chex.assert_rank(next_ids, 2)
        chex.assert_equal_shape_prefix([hidden, next_ids], 2)
        segment_ids, positions = resolve_segments(next_ids, segment_ids, positions, None)
        cos, sin = rope_cos_sin(positions, self.config, self.config.jnp_dtype)
        x, stats, _ = self.mtp.final_hidden(hidden, next_ids, cos, sin, segment_mask(segment_ids),
                                            segment_ids=segment_ids, remat=self.config.remat)
        return x, stats

    def mtp_cached(self, hidden, next_ids, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """`mtp_logits` over the next S slots of an MTP cache (`KVCache.create(..., mtp=True)`),
        for speculative decoding: row t of the inputs is MTP position cache.length + t."""
        chex.assert_rank(next_ids, 2)
        cache, positions, mask = cache.advance(jnp.ones(next_ids.shape, bool))
        cos, sin = rope_cos_sin(positions, self.config, self.config.jnp_dtype)
        logits, _, (k, v) = self.mtp(hidden, next_ids, cos, sin, mask,
                                     (cache.k["mtp"][0], cache.v["mtp"][0], cache.length))
        return logits, cache.replace(k={"mtp": k[None]}, v={"mtp": v[None]},
                                     length=cache.length + next_ids.shape[1])


def resolve_segments(input_ids, segment_ids, positions, padding_mask):
    """Fills in segment ids [B, S] int32 and positions [B, S] int32 (index within the segment)."""
    if padding_mask is not None:
        if segment_ids is not None:
            raise ValueError("pass either attention_mask or segment_ids, not both")
        segment_ids = padding_mask
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    chex.assert_equal_shape([input_ids, segment_ids])
    if positions is None:
        index = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
            axis=1)
        positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    positions = jnp.asarray(positions, jnp.int32)
    chex.assert_equal_shape([input_ids, positions])
    return segment_ids, positions
