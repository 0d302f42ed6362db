"""MoE routing replay: generation records the experts every token was routed to, and the
training forward given them selects exactly those experts, after a parameter update too and
under expert parallelism, while the router still gets its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm_jax import sharding
from glm_jax.config import ModelConfig
from glm_jax.errors import InputError
from glm_jax.infer.engine import SamplingConfig, generate
from glm_jax.model import GlmMoeModel
from glm_jax.rl.grpo import GrpoConfig, make_grpo_step, rollout_batch
from glm_jax.train.step import TrainState

CONFIG = ModelConfig.preset("tiny")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18]]
SEQ_LEN = 16


@pytest.fixture(scope="module")
def rollout():
    model = GlmMoeModel(CONFIG, rngs=nnx.Rngs(0))
    out = generate(model, PROMPTS, max_new_tokens=10, sampling=SamplingConfig(temperature=1.0),
                   seeds=list(range(len(PROMPTS))), record_routing=True)
    completions = [out.tokens[i, :out.lengths[i]].tolist() for i in range(len(PROMPTS))]
    logprobs = [out.logprobs[i, :out.lengths[i]].tolist() for i in range(len(PROMPTS))]
    batch = rollout_batch(PROMPTS, completions, logprobs, [1.0, -1.0, 0.5, -0.5],
                          seq_len=SEQ_LEN, temperature=1.0, routing=out.routing)
    return model, out, completions, batch


def _expert_ids(model, batch, routing=None):
    """[B, S, L, k] the experts the training forward selected."""
    out = model.forward(batch["input_ids"][0], segment_ids=batch["segment_ids"][0],
                        positions=batch["positions"][0], routing=routing)
    return np.moveaxis(np.asarray(out.moe_stats.expert_ids), 0, 2), out


def test_generation_records_every_tokens_experts(rollout):
    model, out, completions, _ = rollout
    for prompt, completion, recorded in zip(PROMPTS, completions, out.routing):
        sequence = jnp.asarray([prompt + completion])
        expected, _ = _expert_ids(model, {"input_ids": sequence[None],
                                          "segment_ids": jnp.ones_like(sequence)[None],
                                          "positions": jnp.arange(sequence.shape[1])[None, None]})
        assert recorded.shape == (len(prompt) + len(completion), CONFIG.num_moe_layers,
                                  CONFIG.num_experts_per_tok)
        np.testing.assert_array_equal(recorded, expected[0])


def test_replay_selects_the_rollouts_experts_after_an_update(rollout):
    model, _, _, batch = rollout
    optimizer = optax.adam(0.3)  # a large step: the router's own choice moves
    graphdef, state = TrainState.create(model, optimizer)
    state = jax.tree.map(jnp.copy, state)
    step = make_grpo_step(graphdef, optimizer, GrpoConfig())
    state, _ = step(state, batch, jax.random.key(0))
    updated = nnx.merge(graphdef, state.params, state.buffers)
    valid = batch["segment_ids"][0] > 0
    recorded = batch["routing"][0]
    free, _ = _expert_ids(updated, batch)
    replayed, _ = _expert_ids(updated, batch, routing=recorded)
    assert (free[valid] != recorded[valid]).any()  # without replay the choice changed
    np.testing.assert_array_equal(replayed[valid], recorded[valid])


def test_replay_keeps_the_router_gradient(rollout):
    model, _, _, batch = rollout
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        return jnp.mean(m.forward(batch["input_ids"][0], routing=batch["routing"][0]).logits ** 2)

    grads = jax.grad(loss)(params)
    router = np.asarray(grads["moe_layers"]["mlp"]["gate"]["kernel"][...])
    assert np.abs(router).max() > 0


@pytest.mark.parametrize("shape", [{"expert": 4, "data": 2}, {"expert": 8}],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_replay_under_expert_parallelism_matches_one_device(rollout, shape):
    model, _, _, batch = rollout
    rng = np.random.default_rng(0)  # a routing the router would never choose: any experts
    routing = np.stack([rng.permutation(CONFIG.n_routed_experts)[:CONFIG.num_experts_per_tok]
                        for _ in range(np.prod(batch["routing"][0].shape[:3]))])
    routing = routing.reshape(batch["routing"][0].shape).astype(np.int32)
    ids = np.concatenate([batch["input_ids"][0]] * 2)  # 8 rows: one per data x expert shard
    routing = np.concatenate([routing, routing[::-1]])
    reference = model.forward(jnp.asarray(ids), routing=jnp.asarray(routing))
    mesh = sharding.make_mesh(shape)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, i, r: nnx.merge(graphdef, s).forward(i, routing=r))(
            state, jax.device_put(ids, sharding.batch_sharding(mesh)), jnp.asarray(routing))
    np.testing.assert_allclose(out.logits, reference.logits, atol=1e-4)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(out.moe_stats.expert_ids), 0, 2),
                                  routing)
    np.testing.assert_array_equal(out.moe_stats.tokens_per_expert,
                                  reference.moe_stats.tokens_per_expert)


def test_routing_of_the_wrong_shape_is_refused(rollout):
    model, _, _, batch = rollout
    with pytest.raises(InputError, match=r"routing: expected shape"):
        model.forward(batch["input_ids"][0], routing=batch["routing"][0][:, :, :1])
    with pytest.raises(ValueError, match="row 0: routing holds 2 tokens"):
        rollout_batch([[1, 2]], [[3, 4]], [[0.0, 0.0]], [1.0], seq_len=8,
                      routing=[np.zeros((2, 2, 2), np.uint8)])
