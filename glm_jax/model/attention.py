"""Grouped-query attention with q/k/v bias, per-head QK RMSNorm before RoPE and partial NeoX RoPE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import ModelConfig
from glm_jax.model.layers import Linear, RMSNorm, apply_rope


def segment_mask(segment_ids):
    """[B, S] segment ids -> [B, 1, 1, S, S] bool: causal within a segment (ids compare by array
    index, so packed documents whose positions restart never see each other)."""
    seq = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None, None]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, d)
        bias = config.attention_bias
        self.q_proj = Linear(h, self.num_heads * d, bias=bias, axes=("embed", "q_heads"),
                             config=config, rngs=rngs)
        self.k_proj = Linear(h, self.num_kv_heads * d, bias=bias, axes=("embed", "kv_heads"),
                             config=config, rngs=rngs)
        self.v_proj = Linear(h, self.num_kv_heads * d, bias=bias, axes=("embed", "kv_heads"),
                             config=config, rngs=rngs)
        self.o_proj = Linear(self.num_heads * d, h, bias=False, axes=("q_heads", "embed"),
                             config=config, rngs=rngs)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps, config=config, axis_name="head_dim")
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps, config=config, axis_name="head_dim")
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, cos, sin, mask, cache=None):
        """x [B, S, H]; cos/sin [B, S, rotary_dim]; mask [B, 1, 1, S, T] bool -> ([B, S, H], kv).

        Without `cache`, T = S and kv is None. With `cache` = (k [B, T, K, D], v, index), this
        step's keys and values are written at slots [index, index + S) and the queries attend
        over all T slots; kv is the updated (k, v)."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv = None
        if cache is not None:
            k_cache, v_cache, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, 1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, 1)
            kv = (k, v)
        out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), kv


def grouped_attention(q, k, v, mask):
    """q [B, S, N, D], k/v [B, T, K, D] with N = K * G; mask [B, 1, 1, S, T] -> [B, S, N, D].
    Softmax in float32, as transformers' eager path does."""
    b, s, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, n // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, n, d)
