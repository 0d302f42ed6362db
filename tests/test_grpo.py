"""The GRPO step: the temperature convention (the importance ratio is 1 on the first update of
an on-policy batch sampled at T != 1), micro-batch accumulation equal to one big batch for every
aggregation mode, the KL term, and one compilation across steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm_jax.config import ModelConfig
from glm_jax.infer.engine import SamplingConfig, generate
from glm_jax.model import GlmMoeModel
from glm_jax.rl.grpo import GrpoConfig, make_grpo_step, make_policy_logp, rollout_batch
from glm_jax.rl.objectives import AGGREGATIONS
from glm_jax.train.step import TrainState

CONFIG = ModelConfig.preset("tiny")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def rollout():
    model = GlmMoeModel(CONFIG, rngs=nnx.Rngs(0))
    out = generate(model, PROMPTS, max_new_tokens=10, sampling=SamplingConfig(temperature=TEMPERATURE),
                   seeds=list(range(len(PROMPTS))))
    completions = [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(PROMPTS))]
    logprobs = [out.logprobs[i, :out.lengths[i]].tolist() for i in range(len(PROMPTS))]
    return model, completions, logprobs


def _state(model, optimizer):
    """A fresh copy each time: the step donates its state, the module's arrays stay intact."""
    graphdef, state = TrainState.create(model, optimizer)
    return graphdef, jax.tree.map(jnp.copy, state)


def _batch(rollout, micro_batches=1, advantages=(1.0, -1.0, 0.5, -0.5)):
    _, completions, logprobs = rollout
    return rollout_batch(PROMPTS, completions, logprobs, list(advantages), seq_len=16,
                         micro_batches=micro_batches, temperature=TEMPERATURE)


def test_ratio_is_one_on_the_first_update_of_an_on_policy_batch(rollout):
    model = rollout[0]
    optimizer = optax.sgd(0.1)
    graphdef, state = _state(model, optimizer)
    step = make_grpo_step(graphdef, optimizer, GrpoConfig(eps_low=0.2, eps_high=0.28))
    batch = _batch(rollout)
    assert batch["mask"].sum() == sum(len(c) for c in rollout[1])
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics["ratio_min"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["ratio_max"]) == pytest.approx(1.0, abs=1e-4)
    assert float(metrics["clip_frac_low"]) == float(metrics["clip_frac_high"]) == 0.0
    # the same batch at T = 1 is off-policy: the ratio moves
    wrong = dict(batch, temperature=np.float32(1.0))
    graphdef, state = _state(model, optimizer)
    _, metrics = step(state, wrong, jax.random.key(0))
    assert abs(float(metrics["ratio_mean"]) - 1.0) > 1e-3


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_accumulate_to_the_whole_batch(rollout, mode):
    model = rollout[0]
    optimizer = optax.sgd(0.05)
    config = GrpoConfig(aggregation=mode)
    results = []
    for micro in (1, 2):
        graphdef, state = _state(model, optimizer)
        step = make_grpo_step(graphdef, optimizer, config)
        batch = _batch(rollout, micro, advantages=(1.0, -0.2, 0.5, 0.3))  # a non-zero mean
        state, metrics = step(state, batch, jax.random.key(0))
        results.append((state.params, metrics))
    (p1, m1), (p2, m2) = results
    assert abs(float(m1["pg_loss"])) > 0.05
    assert float(m1["pg_loss"]) == pytest.approx(float(m2["pg_loss"]), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)


def test_kl_to_itself_is_zero_and_needs_a_reference(rollout):
    model = rollout[0]
    optimizer = optax.sgd(0.1)
    graphdef, state = _state(model, optimizer)
    reference = jax.tree.map(jnp.copy, state.params)
    step = make_grpo_step(graphdef, optimizer, GrpoConfig(kl_beta=0.1))
    _, metrics = step(state, _batch(rollout), jax.random.key(0), reference)
    assert abs(float(metrics["kl"])) < 1e-6
    graphdef, state = _state(model, optimizer)
    with pytest.raises(ValueError, match="needs ref_params"):
        step(state, _batch(rollout), jax.random.key(0))


def test_steps_compile_once_and_the_policy_moves(rollout):
    model = rollout[0]
    optimizer = optax.adam(1e-2)
    graphdef, state = _state(model, optimizer)
    step = make_grpo_step(graphdef, optimizer, GrpoConfig())
    before = jax.tree.map(np.asarray, state.params)
    for i in range(3):
        advantages = np.random.default_rng(i).normal(size=len(PROMPTS))
        state, metrics = step(state, _batch(rollout, 2, advantages), jax.random.key(i))
    assert step._cache_size() == 1
    assert int(state.step) == 3
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
    assert max(jax.tree.leaves(moved)) > 0


def test_an_update_raises_the_log_prob_of_rewarded_completions(rollout):
    """The sign convention end to end: positive advantage -> more likely, negative -> less."""
    model = rollout[0]
    optimizer = optax.sgd(0.05)
    graphdef, state = _state(model, optimizer)
    batch = _batch(rollout, advantages=(1.0, -1.0, 0.0, 0.0))
    policy_logp = make_policy_logp(graphdef)
    before = np.asarray(policy_logp(state, batch))[0]
    state, _ = make_grpo_step(graphdef, optimizer, GrpoConfig())(state, batch, jax.random.key(0))
    after = np.asarray(policy_logp(state, batch))[0]
    mask = batch["mask"][0]
    change = ((after - before) * mask).sum(axis=1)
    np.testing.assert_allclose(before * mask, batch["old_logp"][0] * mask, atol=1e-4)
    assert change[0] > 0 > change[1], change


def test_importance_weights_scale_each_tokens_loss(rollout):
    """Truncated IS for FP8 rollouts: `is_weight` multiplies the per-token loss (detached)."""
    model = rollout[0]
    optimizer = optax.sgd(0.0)
    graphdef, _ = _state(model, optimizer)
    step = make_grpo_step(graphdef, optimizer, GrpoConfig(aggregation="token-mean"))
    batch = _batch(rollout)
    out = {}
    for name, scale in (("one", 1.0), ("two", 2.0), ("zero", 0.0)):
        weighted = dict(batch, is_weight=(batch["mask"] * scale).astype(np.float32))
        _, out[name] = step(_state(model, optimizer)[1], weighted, jax.random.key(0))
    assert float(out["two"]["pg_loss"]) == pytest.approx(2 * float(out["one"]["pg_loss"]), rel=1e-5)
    assert float(out["two"]["grad_norm"]) == pytest.approx(2 * float(out["one"]["grad_norm"]),
                                                           rel=1e-4)
    assert float(out["zero"]["grad_norm"]) == 0.0 < float(out["one"]["grad_norm"])


def test_fp8_rollout_weights_are_requantised_after_an_update(rollout):
    from glm_jax.infer import quantize_model

    model = rollout[0]
    optimizer = optax.adam(1e-2)
    graphdef, state = _state(model, optimizer)
    before = nnx.state(quantize_model(nnx.merge(graphdef, state.params, state.buffers)), nnx.Param)
    state, _ = make_grpo_step(graphdef, optimizer, GrpoConfig())(state, _batch(rollout),
                                                                 jax.random.key(0))
    policy = nnx.merge(graphdef, state.params, state.buffers)
    after = nnx.state(quantize_model(policy), nnx.Param)
    experts = lambda tree: np.asarray(tree["moe_layers"]["mlp"]["experts"]["gate_proj"][...])
    assert not np.array_equal(experts(before), experts(after))  # the sampler follows the policy
    # and stays on the FP8 grid rather than taking the policy's float32 values
    assert not np.array_equal(experts(after), np.asarray(
        nnx.state(policy, nnx.Param)["moe_layers"]["mlp"]["experts"]["gate_proj"][...]))


def test_rollout_batch_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        rollout_batch([[1, 2]], [[3, 4]], [[0.0]], [1.0], seq_len=8)
    with pytest.raises(ValueError, match="exceed seq_len"):
        rollout_batch([[1] * 8], [[3, 4]], [[0.0, 0.0]], [1.0], seq_len=8)


def test_grad_clip_equals_optax_clipping_chained_into_the_optimizer(rollout):
    model = rollout[0]
    batch = _batch(rollout)
    sgd = optax.sgd(0.5)
    runs = {}
    for name, optimizer, clip in (("step", sgd, 1e-3), ("chained", optax.chain(
            optax.clip_by_global_norm(1e-3), sgd), 0.0), ("none", sgd, 0.0)):
        graphdef, state = _state(model, optimizer)
        step = make_grpo_step(graphdef, optimizer, GrpoConfig(grad_clip=clip))
        runs[name] = step(state, batch, jax.random.key(0))
    assert float(runs["step"][1]["grad_norm"]) == float(runs["chained"][1]["grad_norm"]) > 1e-3
    for a, b in zip(jax.tree.leaves(runs["step"][0].params),
                    jax.tree.leaves(runs["chained"][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, c) for a, c in zip(jax.tree.leaves(runs["step"][0].params),
                                                     jax.tree.leaves(runs["none"][0].params)))
