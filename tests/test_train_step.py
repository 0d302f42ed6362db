"""Loss-free balancing, MaxVio, and the train step (accumulation, skip guard, bias updates)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import kernels
from glm_jax import GlmMoeModel, InputError, ModelConfig
from glm_jax.train.balance import balance_bias_update, max_violation
from glm_jax.train.step import StepConfig, TrainState, make_train_step, mtp_targets

CONFIG = ModelConfig.preset("tiny")


def test_max_violation():
    np.testing.assert_allclose(max_violation(jnp.array([[4, 4, 4, 4], [10, 2, 2, 2]])), [0.0, 1.5])


def test_bias_update_drives_max_vio_down_on_a_skewed_router():
    """Router logits favour experts 0-3 strongly; the sign update alone balances the load."""
    e, k = 16, 2
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4096, e)) + np.where(np.arange(e) < 4, 2.0, 0.0),
                         jnp.float32)
    bias = jnp.zeros(e, jnp.float32)
    route = lambda b: kernels.route(logits, b, top_k=k, n_group=1, topk_group=1,
                                    norm_topk_prob=True, routed_scaling_factor=1.0)[2]
    history = []
    for _ in range(300):
        load = route(bias)
        history.append(float(max_violation(load)))
        bias = balance_bias_update(bias, load, 0.01)
    assert history[0] > 2.0
    assert max(history[-20:]) < 0.25
    assert history[-1] < history[0] / 8


def _batch(rng, micro, batch, seq, vocab=64):
    ids = rng.integers(0, vocab, (micro, batch, seq + 1)).astype(np.int32)
    return dict(input_ids=ids[..., :-1], target_ids=ids[..., 1:],
                segment_ids=np.ones((micro, batch, seq), np.int32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (micro, batch, seq)),
                loss_mask=np.ones((micro, batch, seq), np.float32))


@pytest.fixture(scope="module")
def setup():
    model = nnx.jit(lambda: GlmMoeModel(CONFIG, rngs=nnx.Rngs(0)))()
    return model


def _fresh_state(model, optimizer):
    """A state with its own buffers: the step donates (deletes) the arrays it is given."""
    graphdef, state = TrainState.create(model, optimizer)
    return graphdef, jax.tree.map(jnp.copy, state)


def _run(model, optimizer, batches, cfg=StepConfig()):
    graphdef, state = _fresh_state(model, optimizer)
    step = make_train_step(graphdef, optimizer, cfg, 1e-3)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics


def test_gradient_accumulation_equals_one_big_batch(setup):
    rng = np.random.default_rng(1)
    big = _batch(rng, 1, 4, 16)
    split = {k: v.reshape(2, 2, 16) for k, v in big.items()}
    sgd = optax.sgd(0.1)
    state_a, m_a = _run(setup, sgd, [big])
    state_b, m_b = _run(setup, sgd, [split])
    np.testing.assert_allclose(m_a[0]["loss"], m_b[0]["loss"], rtol=1e-5)
    np.testing.assert_array_equal(m_a[0]["expert_load"], m_b[0]["expert_load"])
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_loss_falls_and_biases_move(setup):
    rng = np.random.default_rng(2)
    batch = _batch(rng, 1, 4, 32)
    state, metrics = _run(setup, optax.adamw(3e-3), [batch] * 15)
    assert metrics[-1]["ce_loss"] < metrics[0]["ce_loss"] - 1.0
    assert metrics[0]["mtp_loss"] > 0 and metrics[0]["aux_loss"] > 0
    biases = [v[...] for p, v in nnx.to_flat_state(state.buffers)]
    assert all(np.abs(np.asarray(b)).max() > 0 for b in biases)  # main and MTP routers
    assert not any(m["skipped"] for m in metrics)


def test_non_finite_loss_skips_the_update(setup):
    rng = np.random.default_rng(3)
    batch = _batch(rng, 1, 2, 16)
    graphdef, state = _fresh_state(setup, optax.sgd(0.1))
    step = make_train_step(graphdef, optax.sgd(0.1), StepConfig(), 0.1)
    before = jax.tree.map(np.asarray, state.params)
    bias_before = jax.tree.map(np.asarray, state.buffers)
    poisoned = dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan))
    state, m = step(state, poisoned)
    assert int(m["skipped"]) == 1 and int(state.step) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(bias_before), jax.tree.leaves(state.buffers)):
        np.testing.assert_array_equal(a, b)


def test_loss_spike_skips_the_update(setup):
    rng = np.random.default_rng(4)
    easy = _batch(rng, 1, 2, 16, vocab=4)
    hard = _batch(rng, 1, 2, 16)
    cfg = StepConfig(spike_factor=1.2, spike_warmup_steps=3)
    state, metrics = _run(setup, optax.adamw(1e-2), [easy] * 8 + [hard], cfg=cfg)
    assert [int(m["skipped"]) for m in metrics] == [0] * 8 + [1]


def test_mtp_targets_stay_inside_documents():
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    batch = dict(target_ids=np.array([[10, 11, 12, 20, 21, 0]]), segment_ids=seg,
                 loss_mask=np.array([[1, 1, 0, 1, 0, 0]], np.float32))
    targets, mask = mtp_targets(batch)
    np.testing.assert_array_equal(targets[0, :2], [11, 12])
    np.testing.assert_array_equal(mask[0], [1, 0, 0, 0, 0, 0])


def test_mtp_loss_on_a_model_without_mtp_says_so():
    model = GlmMoeModel(CONFIG.replace(num_nextn_predict_layers=0), rngs=nnx.Rngs(0))
    batch = _batch(np.random.default_rng(5), 1, 2, 8)
    graphdef, state = _fresh_state(model, optax.sgd(0.1))
    step = make_train_step(graphdef, optax.sgd(0.1), StepConfig(mtp_weight=0.3), 0.1)
    with pytest.raises(InputError, match="the model has no MTP layer .* set step.mtp_weight=0"):
        step(state, batch)
    step = make_train_step(graphdef, optax.sgd(0.1), StepConfig(mtp_weight=0.0), 0.1)
    _, metrics = step(state, batch)
    assert float(metrics["mtp_loss"]) == 0.0 and np.isfinite(float(metrics["loss"]))


def test_grad_clip_equals_optax_clipping_chained_into_the_optimizer(setup):
    """StepConfig.grad_clip gives the updates that chaining optax.clip_by_global_norm in front of
    the optimizer gave, and grad_norm stays the norm before clipping."""
    rng = np.random.default_rng(5)
    batches = [_batch(rng, 2, 2, 16) for _ in range(2)]
    sgd = optax.sgd(0.1)
    clipped, m_clipped = _run(setup, sgd, batches, cfg=StepConfig(grad_clip=0.05))
    chained, m_chained = _run(setup, optax.chain(optax.clip_by_global_norm(0.05), sgd), batches)
    unclipped, _ = _run(setup, sgd, batches)
    assert m_clipped[0]["grad_norm"] > 0.05  # the clip is active
    for a, b in zip(jax.tree.leaves(m_clipped), jax.tree.leaves(m_chained)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for a, b, c in zip(jax.tree.leaves(clipped.params), jax.tree.leaves(chained.params),
                       jax.tree.leaves(unclipped.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, c) for a, c in zip(jax.tree.leaves(clipped.params),
                                                     jax.tree.leaves(unclipped.params)))
