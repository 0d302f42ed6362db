"""KV-cache generation: every decoded step equals the full forward pass, padding and batching
change nothing, stop tokens, sampling controls, streaming, and sharded decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, sharding
from glm_jax.infer import SamplingConfig, generate, sample, stream

CONFIG = ModelConfig.preset("tiny")
PROMPTS = [[5, 17, 300, 42, 9, 77, 1], [400, 3, 250]]
GREEDY = SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: GlmMoeModel(CONFIG, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPTS, max_new_tokens=8, sampling=GREEDY)


def test_decoded_steps_equal_the_full_forward(model, greedy):
    for row, prompt in enumerate(PROMPTS):
        sequence = np.asarray(prompt + greedy.tokens[row].tolist(), np.int32)[None]
        logits = np.asarray(model(sequence)[0])  # one full forward, no cache
        steps = logits[len(prompt) - 1:-1]  # the logits each generated token was chosen from
        np.testing.assert_array_equal(greedy.tokens[row], steps.argmax(-1))
        expected = jax.nn.log_softmax(steps)[np.arange(8), greedy.tokens[row]]
        np.testing.assert_allclose(greedy.logprobs[row], expected, atol=1e-5)
    np.testing.assert_array_equal(greedy.lengths, [8, 8])


def test_batching_and_left_padding_change_nothing(model, greedy):
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=8, sampling=GREEDY)
        np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[row])
        np.testing.assert_allclose(alone.logprobs[0], greedy.logprobs[row], atol=1e-5)


def test_stop_tokens_end_rows(model, greedy):
    stop = int(greedy.tokens[0, 2])
    out = generate(model, PROMPTS, max_new_tokens=8, sampling=GREEDY, stop_tokens=[stop],
                   pad_id=-1)
    first = list(greedy.tokens[0]).index(stop)
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], greedy.tokens[0, :first + 1])
    assert (out.tokens[0, first + 1:] == -1).all() and (out.logprobs[0, first + 1:] == 0).all()


def test_sampling_controls():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32))
    greedy = sample(logits, keys, GREEDY)
    np.testing.assert_array_equal(sample(logits, keys, SamplingConfig(top_k=1)), greedy)
    np.testing.assert_array_equal(sample(logits, keys, SamplingConfig(top_p=1e-6)), greedy)
    draws = np.stack([sample(logits, jax.vmap(jax.random.key)(jnp.arange(4, dtype=jnp.uint32) + 10 * i),
                             SamplingConfig(top_k=3)) for i in range(30)])
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    assert all(set(draws[:, r]) <= set(top3[r]) for r in range(4))
    assert len({tuple(d) for d in draws}) > 1
    with pytest.raises(ValueError, match="invalid sampling"):
        SamplingConfig(top_p=0.0)


def test_seeds_and_streaming(model):
    warm = SamplingConfig(temperature=1.0)
    a = generate(model, PROMPTS, max_new_tokens=6, sampling=warm, seeds=[1, 2])
    b = generate(model, PROMPTS, max_new_tokens=6, sampling=warm, seeds=[1, 2])
    c = generate(model, PROMPTS, max_new_tokens=6, sampling=warm, seeds=[3, 4])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    streamed = list(stream(model, PROMPTS[0], max_new_tokens=6, sampling=warm, seed=1))
    assert streamed == a.tokens[0].tolist()


def test_sharded_generation_matches(model, greedy):
    mesh = sharding.make_mesh({"data": 2, "expert": 4})
    graphdef, state = nnx.split(model)
    placed = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))
    with sharding.use_mesh(mesh):
        out = generate(placed, PROMPTS, max_new_tokens=8, sampling=GREEDY)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_mtp_speculative_equals_greedy(model, greedy):
    from glm_jax.infer.speculative import speculative_greedy

    for row, prompt in enumerate(PROMPTS):
        result = speculative_greedy(model, prompt, max_new_tokens=8)
        assert result.tokens == greedy.tokens[row].tolist()
        assert result.main_forwards <= 7 and 0 <= result.acceptance_rate <= 1


def test_mtp_speculative_accepts_a_perfect_drafter(model):
    """Zeroed output norms make every logit 0 in both heads, so greedy (lowest id on ties) and the
    MTP guess are always token 0: every draft is accepted and the main forwards halve."""
    from glm_jax.infer.speculative import speculative_greedy

    graphdef, state = nnx.split(model)
    agreeing = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    for scale in (agreeing.norm.scale, agreeing.mtp.shared_head.norm.scale):
        scale[...] = jnp.zeros_like(scale[...])
    result = speculative_greedy(agreeing, PROMPTS[0], max_new_tokens=9)
    assert result.tokens == [0] * 9
    assert result.acceptance_rate == 1.0 and result.main_forwards == 4
