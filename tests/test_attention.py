"""The attention op's backends against the jnp reference: values and gradients under causal,
packed, left-padded and decode (KV-cache) masks with grouped query heads; the TPU splash kernel
in the Pallas interpreter, alone and batch-split over a mesh; the whole model with each backend;
and the blockwise backend's compiled memory at glm45_mini's attention shapes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig
from glm_jax.errors import ConfigError
import glm_jax.model.attention as attention_module
from glm_jax import sharding
from glm_jax.model.attention import (attention, blockwise_attention, grouped_attention,
                                     nn_attention, resolve_impl, segment_mask, splash_attention)
from glm_jax.model.cache import KVCache
from glm_jax.model.transformer import resolve_segments

S = 11
BACKENDS = {
    "blockwise_4": lambda q, k, v, m: blockwise_attention(q, k, v, m, block_size=4),
    "blockwise_one_block": lambda q, k, v, m: blockwise_attention(q, k, v, m, block_size=64),
    "xla": lambda q, k, v, m: nn_attention(q, k, v, m, causal=False, implementation="xla"),
}


def _causal_mask():
    return segment_mask(jnp.ones((2, S), jnp.int32))


def _packed_mask():
    return segment_mask(jnp.array([[1] * 4 + [2] * 7, [1] * 2 + [2] * 5 + [3] * 4]))


def _left_padded_mask():
    padding = jnp.array([[0] * 3 + [1] * 8, [1] * S])
    return segment_mask(resolve_segments(padding, None, None, padding)[0])


def _cache_masks():
    """A 16-slot cache: a prefill of 10 slots whose first row is left-padded by 4 (those 4 query
    rows see no slot at all), then a 3-token step (S=3, T=16) -> (prefill mask, step mask)."""
    cache = KVCache.create(ModelConfig.preset("tiny"), 2, 16)
    cache, _, prefill = cache.advance(jnp.array([[False] * 4 + [True] * 6, [True] * 10]))
    _, _, step = cache.advance(jnp.array([[False, True, True], [True, True, True]]))
    return prefill, step


MASKS = {"causal": _causal_mask, "packed": _packed_mask, "left_padded": _left_padded_mask,
         "prefill": lambda: _cache_masks()[0], "decode": lambda: _cache_masks()[1]}


def _qkv(mask, heads=4, kv_heads=2, dtype=jnp.float32):
    b, _, _, s, t = mask.shape
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (b, s, heads, 8), dtype),
            jax.random.normal(kk, (b, t, kv_heads, 8), dtype),
            jax.random.normal(kv, (b, t, kv_heads, 8), dtype))


def _value_and_grads(fn, q, k, v, mask):
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32) * weights)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


@functools.cache
def _case(mask_name, heads, kv_heads):
    """(inputs, the reference's value and gradients), computed once per case."""
    mask = MASKS[mask_name]()
    inputs = (*_qkv(mask, heads, kv_heads), mask)
    return inputs, _value_and_grads(grouped_attention, *inputs)


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 1)])
def test_backend_equals_reference(backend, mask_name, heads, kv_heads):
    inputs, want = _case(mask_name, heads, kv_heads)
    got = _value_and_grads(BACKENDS[backend], *inputs)
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_fully_masked_rows_average_v_like_the_reference():
    mask = _cache_masks()[0]
    assert not mask[0, 0, 0, :4].any()
    q, k, v = _qkv(mask)
    out = blockwise_attention(q, k, v, mask, block_size=5)
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(out[0, :4], grouped_attention(q, k, v, mask)[0, :4], atol=1e-6)
    mean_v = jnp.repeat(v[0].mean(0), 2, axis=0)  # [4 heads, D]: query head h reads kv head h // 2
    np.testing.assert_allclose(out[0, 0], mean_v, atol=1e-6)


def test_bfloat16_blockwise_is_close_to_reference():
    mask = _packed_mask()
    q, k, v = _qkv(mask, dtype=jnp.bfloat16)
    got = blockwise_attention(q, k, v, mask, block_size=4)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(grouped_attention(q, k, v, mask), np.float32), atol=2e-2)


def test_auto_and_cudnn_selection_on_cpu():
    assert resolve_impl("auto", jnp.bfloat16, 512 * 512, 256) == "reference"
    assert resolve_impl("auto", jnp.bfloat16, 512 * 513, 256) == "blockwise"
    assert resolve_impl("reference", jnp.float32, 10 ** 8, 256) == "reference"
    mask = _causal_mask()
    q, k, v = _qkv(mask, dtype=jnp.bfloat16)
    with pytest.raises(ConfigError, match="'cudnn' needs a GPU"):
        attention(q, k, v, mask, impl="cudnn", causal=True)
    with pytest.raises(ConfigError, match="attention_impl"):
        ModelConfig.preset("tiny", attention_impl="flash")


SPLASH_SEGMENTS = {  # S = 256: the kernel's blocks are 128 or more
    "causal": [[1] * 256] * 2,
    "packed": [[1] * 100 + [2] * 156, [1] * 17 + [2] * 200 + [3] * 39],
    "left_padded": [[0] * 60 + [1] * 196, [1] * 256],  # padding is segment 0 (resolve_segments)
}


@pytest.mark.parametrize("segments", sorted(SPLASH_SEGMENTS))
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_splash_equals_reference_in_the_interpreter(segments, heads, kv_heads):
    segment_ids = jnp.asarray(SPLASH_SEGMENTS[segments], jnp.int32)
    mask = segment_mask(segment_ids)
    q, k, v = _qkv(mask, heads, kv_heads)
    splash = lambda q, k, v, m: splash_attention(q, k, v, segment_ids, interpret=True)
    got, want = (_value_and_grads(fn, q, k, v, mask) for fn in (splash, grouped_attention))
    chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("axes", [{"fsdp": 4, "expert": 2}, {"fsdp": 2, "expert": 2, "tensor": 2}])
def test_splash_splits_rows_and_heads_over_a_mesh(axes):
    """Under a mesh the kernel runs per device on its rows and, with "tensor", its kv heads."""
    segment_ids = jnp.asarray([[1] * 128 + [2] * 128, [1] * 256] * 4, jnp.int32)  # 8 rows
    mask = segment_mask(segment_ids)
    q, k, v = _qkv(mask)
    want = grouped_attention(q, k, v, mask)
    mesh = sharding.make_mesh(axes)
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        sharding.BATCH_AXES, None, "tensor" if "tensor" in axes else None, None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    ids = jax.device_put(segment_ids, sharding.batch_sharding(mesh))
    run = lambda q, k, v, ids: splash_attention(q, k, v, ids, interpret=True)
    with jax.set_mesh(mesh):
        got = jax.jit(run)(q, k, v, ids)
        jaxpr = jax.make_jaxpr(run)(q, k, v, ids)
    np.testing.assert_allclose(got, want, atol=2e-5)
    (split,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    q_spec = split.params["in_specs"][-4]  # (the kernel's mask tables come first) q, k, v, ids
    assert q_spec[0] == tuple(sharding.BATCH_AXES)
    assert q_spec[2] == "tensor"  # kv heads split over "tensor" (size 1 when not in `axes`)


def test_splash_selection(monkeypatch):
    mask = _causal_mask()
    q, k, v = _qkv(mask)
    segment_ids = jnp.ones((2, S), jnp.int32)
    with pytest.raises(ConfigError, match="'splash' needs a TPU"):
        attention(q, k, v, mask, impl="splash", causal=True, segment_ids=segment_ids)
    # without segment ids (a KV cache) "splash" means "auto": here the reference
    np.testing.assert_array_equal(attention(q, k, v, mask, impl="splash"),
                                  attention(q, k, v, mask, impl="reference"))
    monkeypatch.setattr(attention_module, "_platform", lambda: "tpu")
    assert resolve_impl("auto", jnp.bfloat16, 4096 ** 2, 256, splash_ok=True) == "splash"
    assert resolve_impl("auto", jnp.bfloat16, 4096 ** 2, 256, splash_ok=False) == "blockwise"
    assert resolve_impl("auto", jnp.bfloat16, 256 ** 2, 256, splash_ok=True) == "reference"


def test_runtime_fields_stay_out_of_the_hf_config():
    config = ModelConfig.preset("tiny", attention_impl="blockwise", attention_block_size=64)
    hf = config.to_hf()
    assert "attention_impl" not in hf and "attention_block_size" not in hf
    back = ModelConfig.from_hf({**hf, "attention_impl": "cudnn"})
    assert back.attention_impl == "auto" and back == config.replace(
        attention_impl="auto", attention_block_size=256)


def _models(impl):
    """The tiny model with the reference attention and with `impl` (blocks of 4), same weights."""
    reference = GlmMoeModel(ModelConfig.preset("tiny", attention_impl="reference"),
                            rngs=nnx.Rngs(0))
    config = ModelConfig.preset("tiny", attention_impl=impl, attention_block_size=4)
    other = nnx.merge(nnx.graphdef(GlmMoeModel(config, rngs=nnx.Rngs(0))), nnx.state(reference))
    return reference, other


def test_model_logits_blockwise_equal_reference():
    reference, blockwise = _models("blockwise")
    ids = jax.random.randint(jax.random.key(1), (2, 13), 0, 512)
    segments = jnp.array([[1] * 6 + [2] * 7, [0] * 3 + [1] * 10])
    forward = nnx.jit(lambda m, ids, seg: m.forward(ids, segment_ids=seg))
    want, got = forward(reference, ids, segments), forward(blockwise, ids, segments)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    mtp = nnx.jit(lambda m, h, ids: m.mtp_logits(h, ids))
    np.testing.assert_allclose(mtp(blockwise, got.hidden, ids), mtp(reference, want.hidden, ids),
                               atol=1e-4)


def test_model_with_splash_equals_reference(monkeypatch):
    """attention_impl="splash" on a (pretended) TPU, the kernel in the interpreter: the model's
    logits, MTP logits and gradients over packed rows equal the reference's."""
    monkeypatch.setattr(attention_module, "_platform", lambda: "tpu")
    calls = []

    def interpreted(q, k, v, segment_ids):
        calls.append(q.shape)
        return splash_attention(q, k, v, segment_ids, interpret=True)

    monkeypatch.setattr(attention_module, "splash_attention", interpreted)
    reference, splash = _models("splash")
    ids = jax.random.randint(jax.random.key(2), (2, 256), 0, 512)
    segments = jnp.array([[1] * 100 + [2] * 156, [0] * 30 + [1] * 226])

    def loss(model):
        out = model.forward(ids, segment_ids=segments)
        mtp = model.mtp_logits(out.hidden, ids, segment_ids=segments)
        return jnp.mean(out.logits ** 2) + jnp.mean(mtp ** 2), (out.logits, mtp)

    step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (_, want), want_grads = step(reference)
    (_, got), got_grads = step(splash)
    chex.assert_trees_all_close(got, want, atol=1e-4)
    chex.assert_trees_all_close(nnx.state(got_grads), nnx.state(want_grads), atol=1e-5)
    assert len(calls) == 3  # traced once each: the dense scan, the MoE scan, the MTP layer


def test_model_decode_blockwise_equals_reference():
    reference, blockwise = _models("blockwise")
    prompt = jax.random.randint(jax.random.key(2), (2, 9), 0, 512)
    valid = jnp.array([[False] * 3 + [True] * 6, [True] * 9])

    @nnx.jit
    def prefill_then_step(model):
        cache = KVCache.create(model.config, 2, 16)
        out, cache = model.forward_cached(prompt, cache, valid=valid)
        step, _ = model.forward_cached(jnp.argmax(out.logits[:, -1:], -1), cache)
        return out.logits[valid], step.logits

    chex.assert_trees_all_close(prefill_then_step(blockwise), prefill_then_step(reference),
                                atol=1e-4)


def _attention_temp_bytes(impl: str) -> int:
    """XLA's temporaries for forward+backward of 2 layers with glm45_mini's attention (40 q / 4 kv
    heads of 128) at 1 x 4,096 tokens in bfloat16; compiled, never run."""
    config = ModelConfig.preset(
        "glm45_mini", vocab_size=512, hidden_size=256, num_hidden_layers=2, intermediate_size=512,
        moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
        num_nextn_predict_layers=0, param_dtype="bfloat16", dtype="bfloat16",
        attention_impl=impl)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0))))
    loss = lambda p, ids: jnp.mean(nnx.merge(graphdef, p)(ids).astype(jnp.float32))
    ids = jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_does_not_grow_with_seq_squared_times_heads():
    assert _attention_temp_bytes("blockwise") <= 2 * 2 ** 30  # measured 0.72 GiB; reference 14.3
