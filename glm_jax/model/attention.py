"""Grouped-query attention with q/k/v bias, per-head QK RMSNorm before RoPE and partial NeoX RoPE.

One op, `attention`, with backends (ModelConfig.attention_impl): "reference" (plain jnp, all
[S, T] scores at once: fastest for small shapes and decoding), "blockwise" (online softmax over
key blocks in plain jnp: memory linear in S, runs on every platform), "cudnn" (cuDNN flash
attention through jax.nn.dot_product_attention; GPU only, choosing it elsewhere raises) and "auto".
Written by hand because jax.nn.dot_product_attention's portable ("xla") path materialises the
scores too, and splash / Pallas kernels are platform-specific.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import ModelConfig
from glm_jax.errors import ConfigError
from glm_jax.model.layers import Linear, RMSNorm, apply_rope

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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
        self.impl, self.block_size = config.attention_impl, config.attention_block_size

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
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, impl=self.impl,
                        causal=cache is None, block_size=self.block_size)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), kv


def attention(q, k, v, mask, *, impl: str = "auto", causal: bool = False, block_size: int = 256):
    """q [B, S, N, D], k/v [B, T, K, D] with N = K * G; mask [B, 1, 1, S, T] bool -> [B, S, N, D].

    `impl` is one of ATTENTION_IMPLS; "auto" resolves with `resolve_impl`. `causal` promises that
    S == T and the mask lies inside the lower triangle, so cuDNN may skip the upper half. A row
    whose mask is all False (a left-padding query in a KV cache; nothing reads its output) gets
    the mean of v over all T slots from the reference and blockwise alike; cuDNN turns the mask
    into a large negative bias, which should give the same, but no GPU has checked it yet."""
    chex.assert_rank([q, k, v, mask], [4, 4, 4, 5])
    impl = resolve_impl(impl, q.dtype, q.shape[1] * k.shape[1], block_size)
    if impl == "reference":
        return grouped_attention(q, k, v, mask)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, block_size=block_size)
    if jax.default_backend() != "gpu":
        raise ConfigError(f"ModelConfig.attention_impl: 'cudnn' needs a GPU, but JAX's backend is "
                          f"{jax.default_backend()!r}; use 'auto', 'blockwise' or 'reference'")
    if q.dtype not in _CUDNN_DTYPES:
        raise ConfigError(f"ModelConfig.attention_impl: 'cudnn' needs dtype bfloat16 or float16, "
                          f"got {q.dtype}; use 'auto', 'blockwise' or 'reference'")
    return nn_attention(q, k, v, mask, causal=causal, implementation="cudnn")


def resolve_impl(impl: str, dtype, scores_per_head: int, block_size: int) -> str:
    """"auto" -> the reference while one head's S x T scores fit in 2 x 2 blocks (on CPU it is as
    fast there, and decoding stays on it), else cuDNN on a GPU in 16-bit, else blockwise."""
    if impl != "auto":
        return impl
    if scores_per_head <= 4 * block_size * block_size:
        return "reference"
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES:
        return "cudnn"
    return "blockwise"


def nn_attention(q, k, v, mask, *, causal: bool, implementation: str):
    """jax.nn.dot_product_attention (GQA native) with our mask; "xla" tests this wiring on CPU."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], is_causal=causal,
                                        scale=q.shape[-1] ** -0.5, implementation=implementation)


def grouped_attention(q, k, v, mask):
    """The reference: materialises float32 scores [B, K, G, S, T] for every head. Softmax in
    float32, as transformers' eager path does; a fully masked row averages v uniformly."""
    b, s, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, s, kv_heads, n // kv_heads, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, n, d)


def blockwise_attention(q, k, v, mask, *, block_size: int = 256):
    """Online-softmax (flash-style) attention in plain jnp: query blocks in sequence, each
    scanning key blocks with a running max / sum / float32 accumulator, so at most one
    [B, K, G, block, block] tile of scores exists. Both loops are rematerialised, so the backward
    recomputes tiles instead of storing every block's probabilities. Same signature and masking
    as `grouped_attention`. S and T are padded to whole blocks; padding keys score -inf (masked
    keys finfo.min), so even a fully masked row averages only the real keys, as the reference."""
    b, s, n, d = q.shape
    t, kv_heads = k.shape[1], k.shape[2]
    nq, nk = -(-s // block_size), -(-t // block_size)
    bq, bk = -(-s // nq), -(-t // nk)  # even blocks of at most block_size: little padding
    q = _pad_axis(q.reshape(b, s, kv_heads, n // kv_heads, d), 1, nq * bq)
    k_blocks = _blocks(_pad_axis(k, 1, nk * bk), 1, nk)  # [nk, B, bk, K, D]
    v_blocks = _blocks(_pad_axis(v, 1, nk * bk), 1, nk)
    real_keys = (jnp.arange(nk * bk) < t).reshape(nk, bk)
    mask = _pad_axis(_pad_axis(mask[:, 0, 0], 1, nq * bq), 2, nk * bk)  # [B, S', T']

    @jax.checkpoint
    def query_block(xs):
        q_blk, mask_rows = xs  # [B, bq, K, G, D], [B, bq, T']

        @jax.checkpoint
        def key_step(carry, xs):
            m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D] float32
            k_blk, v_blk, mask_blk, real = xs  # [B, bk, K, D] x2, [B, bq, bk], [bk]
            scores = jnp.einsum("bskgd,btkd->bkgst", q_blk, k_blk,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
            scores = jnp.where(mask_blk[:, None, None], scores, jnp.finfo(jnp.float32).min)
            scores = jnp.where(real, scores, -jnp.inf)
            # The result does not depend on the running max, so it needs no gradient.
            m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(-1)))
            p = jnp.exp(scores - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgst,btkd->bkgsd", p.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

        stats = jnp.zeros((b, kv_heads, n // kv_heads, bq), jnp.float32)
        carry = (stats - jnp.inf, stats, jnp.zeros((*stats.shape, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_step, carry,
                                      (k_blocks, v_blocks, _blocks(mask_rows, 2, nk), real_keys))
        return jnp.moveaxis(acc / l[..., None], 3, 1).astype(q.dtype)  # [B, bq, K, G, D]

    out = jax.lax.map(query_block, (_blocks(q, 1, nq), _blocks(mask, 1, nq)))
    out = jnp.moveaxis(out, 0, 1).reshape(b, nq * bq, n, d)
    return out[:, :s]


def _pad_axis(x, axis: int, size: int):
    """Zero/False-pads `axis` of x up to `size`."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _blocks(x, axis: int, count: int):
    """Splits `axis` into `count` equal blocks stacked on a new leading axis."""
    x = x.reshape(*x.shape[:axis], count, x.shape[axis] // count, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)
