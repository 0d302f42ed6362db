"""Grouped-query attention with q/k/v bias, per-head QK RMSNorm before RoPE and partial NeoX RoPE.

One op, `attention`, with backends (ModelConfig.attention_impl): "reference" (plain jnp, all
[S, T] scores at once: fastest for small shapes and decoding), "blockwise" (online softmax over
key blocks in plain jnp: memory linear in S, runs on every platform), "cudnn" (cuDNN flash
attention through jax.nn.dot_product_attention; GPU only, choosing it elsewhere raises), "splash"
(the Pallas TPU splash-attention kernel from jax.experimental, causal with segment ids; TPU only)
and "auto". The jnp backends are written by hand because jax.nn.dot_product_attention's portable
("xla") path materialises the scores too, and the kernels are platform-specific.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from glm_jax.config import ModelConfig
from glm_jax.errors import ConfigError
from glm_jax.model.layers import Linear, RMSNorm, apply_rope
from glm_jax.sharding import BATCH_AXES
from kernels import backends

_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _platform() -> str:
    """The one place the backends are chosen from (tests pretend other ones): JAX's backend, or
    the one being compiled for (`kernels.backends.targeting`)."""
    return backends.platform()


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

    def __call__(self, x, cos, sin, mask, cache=None, segment_ids=None):
        """x [B, S, H]; cos/sin [B, S, rotary_dim]; mask [B, 1, 1, S, T] bool -> ([B, S, H], kv).

        Without `cache`, T = S and kv is None; `segment_ids` [B, S], when given, are those the
        mask was built from (`segment_mask`), for the kernels that take them instead. With
        `cache` = (k [B, T, K, D], v, index), this step's keys and values are written at slots
        [index, index + S) and the queries attend over all T slots; kv is the updated (k, v)."""
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
                        causal=cache is None, block_size=self.block_size,
                        segment_ids=None if cache is not None else segment_ids)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), kv


def attention(q, k, v, mask, *, impl: str = "auto", causal: bool = False, block_size: int = 256,
              segment_ids=None):
    """q [B, S, N, D], k/v [B, T, K, D] with N = K * G; mask [B, 1, 1, S, T] bool -> [B, S, N, D].

    `impl` is one of ATTENTION_IMPLS; "auto" resolves with `resolve_impl`. `causal` promises that
    S == T and the mask lies inside the lower triangle, so cuDNN may skip the upper half.
    `segment_ids` [B, S] promise that the mask is `segment_mask(segment_ids)`: splash needs them
    and runs only then (with a KV cache there are none, and "splash" resolves as "auto"). A row
    whose mask is all False (a left-padding query in a KV cache; nothing reads its output) gets
    the mean of v over all T slots from the reference and blockwise alike; cuDNN turns the mask
    into a large negative bias, which should give the same, but no GPU has checked it yet."""
    chex.assert_rank([q, k, v, mask], [4, 4, 4, 5])
    if impl == "splash" and segment_ids is None:
        impl = "auto"
    impl = resolve_impl(impl, q.dtype, q.shape[1] * k.shape[1], block_size,
                        splash_ok=segment_ids is not None and _splash_block(q.shape[1]) > 0)
    if impl == "splash":
        if _platform() != "tpu":
            raise ConfigError(f"ModelConfig.attention_impl: 'splash' needs a TPU, but JAX's "
                              f"backend is {_platform()!r}; use 'auto', 'blockwise' "
                              "or 'reference'")
        return splash_attention(q, k, v, segment_ids)
    if impl == "reference":
        return grouped_attention(q, k, v, mask)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, block_size=block_size)
    if _platform() != "gpu":
        raise ConfigError(f"ModelConfig.attention_impl: 'cudnn' needs a GPU, but JAX's backend is "
                          f"{_platform()!r}; use 'auto', 'blockwise' or 'reference'")
    if q.dtype not in _CUDNN_DTYPES:
        raise ConfigError(f"ModelConfig.attention_impl: 'cudnn' needs dtype bfloat16 or float16, "
                          f"got {q.dtype}; use 'auto', 'blockwise' or 'reference'")
    return nn_attention(q, k, v, mask, causal=causal, implementation="cudnn")


def resolve_impl(impl: str, dtype, scores_per_head: int, block_size: int, *,
                 splash_ok: bool = False) -> str:
    """"auto" -> the reference while one head's S x T scores fit in 2 x 2 blocks (on CPU it is as
    fast there, and decoding stays on it), else cuDNN on a GPU in 16-bit, splash on a TPU when
    `splash_ok` (segment ids given, S a multiple of 128), else blockwise."""
    if impl != "auto":
        return impl
    if scores_per_head <= 4 * block_size * block_size:
        return "reference"
    if _platform() == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES:
        return "cudnn"
    if _platform() == "tpu" and splash_ok:
        return "splash"
    return "blockwise"


def _splash_block(seq: int) -> int:
    """The splash kernel's q / kv block: the largest of 512, 256, 128 dividing S (0: none)."""
    return next((b for b in (512, 256, 128) if seq % b == 0), 0)


def _splash_kernel(seq: int, groups: int, interpret: bool):
    """A causal splash-attention kernel for one kv head's `groups` query heads (MQA form). Built
    at every trace, not cached: it holds arrays made while tracing."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = _splash_block(seq)
    if not block:
        raise ConfigError(f"ModelConfig.attention_impl: 'splash' needs a sequence length that "
                          f"is a multiple of 128, got {seq}; use 'auto' or 'blockwise'")
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * groups)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, interpret: bool = False):
    """Causal attention within segments through the splash kernel: q [B, S, N, D], k/v
    [B, S, K, D], segment_ids [B, S] -> [B, S, N, D]. GQA runs as one MQA kernel per kv head
    (vmapped over batch and kv heads). Under a mesh, shard_map splits the batch over the
    data-parallel axes and the kv heads (with their query heads) over "tensor" when it divides
    them (a Pallas call is opaque to the SPMD partitioner). `interpret` runs the kernel in the
    Pallas interpreter (tests on CPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, s, n, d = q.shape
    kv_heads = k.shape[2]
    kernel = _splash_kernel(s, n // kv_heads, interpret)

    def local(q, k, v, segment_ids):
        rows, local_kv = q.shape[0], k.shape[2]
        qh = (q * d ** -0.5).reshape(rows, s, local_kv, n // kv_heads, d)
        qh = qh.transpose(0, 2, 3, 1, 4)  # [B, K, G, S, D]
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, D]

        def one(q1, k1, v1, ids):
            return kernel(q1, k1, v1, segment_ids=SegmentIds(ids, ids))

        out = jax.vmap(jax.vmap(one, (0, 0, 0, None)))(qh, kh, vh, segment_ids)
        return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    heads = "tensor" if kv_heads % mesh.shape.get("tensor", 1) == 0 else None
    spec = P(rows, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(rows)),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


def nn_attention(q, k, v, mask, *, causal: bool, implementation: str):
    """jax.nn.dot_product_attention (GQA native) with our mask; "xla" tests this wiring on CPU."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], is_causal=causal,
                                        scale=q.shape[-1] ** -0.5, implementation=implementation)


def grouped_attention(q, k, v, mask):
    """The reference: materialises float32 scores [B, K, G, S, T] for every head. Softmax in
    float32, as transformers' eager path does; a fully masked row averages v uniformly."""
    b, s, n, d = q.shape
    kv_heads = k.shape[2]
    # Heads first, so both products are plain batched matmuls over (B, K): on XLA:CPU 1.6x
    # faster forward, 1.2x forward + backward, than contracting the [B, S, K, G, D] layout.
    q = q.reshape(b, s, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, S, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)  # [B, K, G, S, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, n, d)


def blockwise_attention(q, k, v, mask, *, block_size: int = 256):
    """Online-softmax (flash-style) attention in plain jnp: query blocks in sequence, each
    scanning key blocks with a running max / sum / float32 accumulator, so at most one
    [B, K, G, block, block] tile of scores exists. Both loops are rematerialised, so the backward
    recomputes tiles instead of storing every block's probabilities. Same signature and masking
    as `grouped_attention`. S and T are padded to whole blocks; padding keys score -inf (masked
    keys finfo.min), so even a fully masked row averages only the real keys, as the reference."""
    b, s, n, d = q.shape
    t, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    nq, nk = -(-s // block_size), -(-t // block_size)
    bq, bk = -(-s // nq), -(-t // nk)  # even blocks of at most block_size: little padding
    # Heads first, laid out once before the loops, so every tile's two products are plain
    # batched matmuls over (B, K): on XLA:CPU 1.4-2x faster forward, 1.2-1.4x forward + backward
    # (RESULTS.md), than contracting the [B, S, K, G, D] layout inside the loops.
    q_blocks = _pad_axis(q.reshape(b, s, kv_heads, g, d), 1, nq * bq).reshape(
        b, nq, bq, kv_heads, g, d).transpose(1, 0, 3, 4, 2, 5)  # [nq, B, K, G, bq, D]
    k_blocks, v_blocks = (_pad_axis(x, 1, nk * bk).reshape(b, nk, bk, kv_heads, d).transpose(
        1, 0, 3, 2, 4) for x in (k, v))  # [nk, B, K, bk, D]
    real_keys = (jnp.arange(nk * bk) < t).reshape(nk, bk)
    mask = _pad_axis(_pad_axis(mask[:, 0, 0], 1, nq * bq), 2, nk * bk)  # [B, S', T']

    @jax.checkpoint
    def query_block(xs):
        q_blk, mask_rows = xs  # [B, K, G, bq, D], [B, bq, T']

        @jax.checkpoint
        def key_step(carry, xs):
            m, l, acc = carry  # [B, K, G, bq], [B, K, G, bq], [B, K, G, bq, D] float32
            k_blk, v_blk, mask_blk, real = xs  # [B, K, bk, D] x2, [B, bq, bk], [bk]
            scores = jnp.einsum("bkgsd,bktd->bkgst", q_blk, k_blk,
                                preferred_element_type=jnp.float32) * (d ** -0.5)
            scores = jnp.where(mask_blk[:, None, None], scores, jnp.finfo(jnp.float32).min)
            scores = jnp.where(real, scores, -jnp.inf)
            # The result does not depend on the running max, so it needs no gradient.
            m_new = jax.lax.stop_gradient(jnp.maximum(m, scores.max(-1)))
            p = jnp.exp(scores - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            pv = jnp.einsum("bkgst,bktd->bkgsd", p.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)
            return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + pv), None

        stats = jnp.zeros((b, kv_heads, g, bq), jnp.float32)
        carry = (stats - jnp.inf, stats, jnp.zeros((*stats.shape, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_step, carry,
                                      (k_blocks, v_blocks, _blocks(mask_rows, 2, nk), real_keys))
        return (acc / l[..., None]).astype(q.dtype)  # [B, K, G, bq, D]

    out = jax.lax.map(query_block, (q_blocks, _blocks(mask, 1, nq)))  # [nq, B, K, G, bq, D]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, d)
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
