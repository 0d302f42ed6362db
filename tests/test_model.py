"""GlmMoeModel behaviour on the tiny preset: shapes, gradients, packing, padding, causality,
remat, unrolled layers, depth-independent tracing, dtype policy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, RouterBias
from glm_jax.model.moe import sequence_aux_loss

CONFIG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return GlmMoeModel(CONFIG, rngs=nnx.Rngs(0))


def _ids(key, shape):
    return jax.random.randint(jax.random.key(key), shape, 0, CONFIG.vocab_size)


@nnx.jit
def _forward(model, ids, segment_ids=None, attention_mask=None):
    return model.forward(ids, segment_ids=segment_ids, attention_mask=attention_mask)


def _loss(model, ids):
    logits = model(ids)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1))


def test_forward_shapes_and_stats(model):
    ids = _ids(0, (2, 12))
    out = _forward(model, ids)
    chex.assert_shape(out.logits, (2, 12, CONFIG.vocab_size))
    chex.assert_shape(out.hidden, (2, 12, CONFIG.hidden_size))
    chex.assert_tree_all_finite(out.logits)
    counts = out.moe_stats.tokens_per_expert
    chex.assert_shape(counts, (CONFIG.num_moe_layers, CONFIG.n_routed_experts))
    # dropless: every token copy reaches an expert in every MoE layer
    np.testing.assert_array_equal(counts.sum(-1), 2 * 12 * CONFIG.num_experts_per_tok)


def _loss_with_mtp(model, ids):
    out = model.forward(ids)
    mtp = model.mtp_logits(out.hidden[:, :-2], ids[:, 1:-1])
    return _loss(model, ids) + jnp.mean(jax.nn.logsumexp(mtp, -1)) + jnp.sum(out.moe_stats.seq_aux_loss)


def test_gradients_reach_every_parameter_but_not_the_balance_bias(model):
    grads = nnx.jit(nnx.grad(_loss_with_mtp))(model, _ids(1, (2, 16)))
    for path, g in nnx.to_flat_state(grads):
        assert np.abs(np.asarray(g[...])).max() > 0, f"zero gradient for {path}"
    assert not jax.tree.leaves(nnx.state(grads, RouterBias))


def test_packed_segments_equal_separate_sequences(model):
    a, b = _ids(2, (1, 5)), _ids(3, (1, 7))
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    logits = _forward(model, packed, segment_ids=segments).logits
    np.testing.assert_allclose(logits[:, :5], _forward(model, a).logits, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:], _forward(model, b).logits, atol=1e-5)


def test_left_padding_with_attention_mask(model):
    ids = _ids(4, (1, 6))
    padded = jnp.concatenate([jnp.zeros((1, 3), ids.dtype), ids], axis=1)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    logits = _forward(model, padded, attention_mask=mask).logits
    np.testing.assert_allclose(logits[:, 3:], _forward(model, ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="either attention_mask or segment_ids"):
        model.forward(padded, attention_mask=mask, segment_ids=mask)


def test_causal(model):
    ids = _ids(5, (1, 10))
    changed = ids.at[0, 7].set((ids[0, 7] + 1) % CONFIG.vocab_size)
    before, after = _forward(model, ids).logits, _forward(model, changed).logits
    np.testing.assert_allclose(before[:, :7], after[:, :7], atol=1e-6)
    assert np.abs(before[:, 7:] - after[:, 7:]).max() > 1e-4


def _with_config(model, **changes):
    """The same weights under another run configuration (remat, compute dtype)."""
    other = nnx.eval_shape(lambda: GlmMoeModel(CONFIG.replace(**changes), rngs=nnx.Rngs(1)))
    nnx.update(other, nnx.state(model))
    return other


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_does_not_change_gradients(model, remat):
    """Remat covers the scanned layers and the MTP layer (its loss is part of this one)."""
    ids = _ids(6, (2, 8))
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_loss_with_mtp))(model, ids)
    loss, grads = nnx.jit(nnx.value_and_grad(_loss_with_mtp))(_with_config(model, remat=remat),
                                                              ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(nnx.state(grads), nnx.state(ref_grads), atol=1e-6)


def test_unrolled_layers_equal_the_scan(model):
    """ModelConfig.unroll_layers runs the same layers as straight-line code: the loss, every
    gradient and the MoE stats agree with the scan (to float reassociation by XLA's fusion)."""
    ids = _ids(8, (2, 12))
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_loss))(model, ids)
    unrolled = _with_config(model, unroll_layers=True)
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(unrolled, ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(nnx.state(grads), nnx.state(ref_grads), atol=1e-6)
    ref_out, out = _forward(model, ids), _forward(unrolled, ids)
    np.testing.assert_array_equal(out.moe_stats.expert_ids, ref_out.moe_stats.expert_ids)


def _equation_count(layers):
    config = CONFIG.replace(num_hidden_layers=layers)
    model = nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.zeros((1, 8), jnp.int32))
    return len(jaxpr.jaxpr.eqns)


def test_trace_size_does_not_grow_with_depth():
    assert _equation_count(3) == _equation_count(12)


def test_bfloat16_policy_close_to_float32(model):
    ids = _ids(7, (1, 12))
    ref = _forward(model, ids).logits
    out = _forward(_with_config(model, dtype="bfloat16"), ids).logits
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05, rtol=0.05)


def test_expert_gradients_come_back_in_bfloat16_and_change_no_number(model, monkeypatch):
    """In 16-bit compute the layer scan takes the float32 expert stacks as they are (no cast
    copy of the whole parameter) and casts each layer's slice, while their gradients come back
    through bfloat16 zeros (ports): the backward scan stacks bfloat16 expert gradients, never
    float32 ones, and the loss and every gradient are bitwise those of casting inside each
    layer without ports."""
    from glm_jax.model import transformer

    bf16 = _with_config(model, dtype="bfloat16", remat="full")  # nothing stored per layer
    ids = _ids(9, (2, 12))
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(bf16, ids)
    graphdef, state = nnx.split(bf16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: _loss(nnx.merge(graphdef, s), ids)))(state)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    experts = state["moe_layers"]["mlp"]["experts"]
    shapes = {experts[n].shape for n in ("gate_proj", "up_proj", "down_proj")}

    def stacks(variables, dtype):  # the stacked expert matrices among them, in `dtype`
        return [v for v in variables if v.aval.shape in shapes and v.aval.dtype == dtype]

    assert any(len(stacks(e.invars, jnp.float32)) == 3 for e in scans)  # taken uncast
    backward = [e for e in scans if stacks(e.outvars, jnp.bfloat16)]
    assert len(backward) == 1 and len(stacks(backward[0].outvars, jnp.bfloat16)) == 3
    assert not [v for e in scans for v in stacks(e.outvars, jnp.float32)]
    monkeypatch.setattr(transformer, "_expert_ports", lambda state, dtype: [None] * len(
        jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))))
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_loss))(bf16, ids)
    assert loss == ref_loss
    chex.assert_trees_all_equal(nnx.state(grads), nnx.state(ref_grads))


def test_mtp_cotangents_handed_back_together_change_no_gradient(model, monkeypatch):
    """The MTP layer's backward returns its weights' and its input's cotangents through one
    optimisation barrier (so a compiler cannot defer the weight gradients past the main
    backward): the loss and every gradient equal those without it."""
    from glm_jax.model import transformer

    ids = _ids(11, (2, 16))
    loss, grads = nnx.jit(nnx.value_and_grad(_loss_with_mtp))(model, ids)
    monkeypatch.setattr(transformer, "_cotangents_together", lambda fn: fn)
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_loss_with_mtp))(model, ids)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(nnx.state(grads), nnx.state(ref_grads), rtol=1e-5, atol=1e-7)


def test_forward_keeps_no_cast_copy_of_the_expert_stacks():
    """XLA's temporaries of a bfloat16 forward stay below the bfloat16 size of the stacked
    experts (measured 2026-12-07: 29 MiB, against 149 MiB when the stacks entered the scan
    cast, beside 120 MiB of bfloat16 experts), and the gradient ports are never materialised."""
    config = CONFIG.replace(dtype="bfloat16", hidden_size=512, moe_intermediate_size=1024,
                            num_hidden_layers=6)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0))))
    experts = state["moe_layers"]["mlp"]["experts"]
    stacks = sum(experts[n].size for n in ("gate_proj", "up_proj", "down_proj")) * 2
    forward = jax.jit(lambda s, i: nnx.merge(graphdef, s).forward(i).logits)
    temp = forward.lower(state, jnp.zeros((1, 16), jnp.int32)).compile().memory_analysis()
    assert temp.temp_size_in_bytes < 0.5 * stacks, (temp.temp_size_in_bytes, stacks)


def test_sequence_aux_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 8)).astype(np.float32)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(12)]).reshape(2, 6, 2)
    scores = 1 / (1 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
    expected = 0.0
    for b in range(2):
        f = np.bincount(ids[b].ravel(), minlength=8) * 8 / (2 * 6)
        expected += (f * probs[b].mean(0)).sum() / 2
    np.testing.assert_allclose(sequence_aux_loss(jnp.asarray(logits), jnp.asarray(ids)), expected,
                               rtol=1e-6)
