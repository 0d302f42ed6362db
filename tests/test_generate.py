"""KV-cache generation: every decoded step equals the full forward pass, padding and batching
change nothing, stop tokens, sampling controls, streaming, sharded decoding, compilation once
per shape bucket, a chat session's cache kept across turns, and bad input refused."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import glm_jax.infer.engine as engine
from glm_jax import GlmMoeModel, InputError, ModelConfig, sharding
from glm_jax.infer import ChatSession, SamplingConfig, generate, sample, stream
from glm_jax.model.cache import KVCache

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


def test_unrolled_layers_decode_the_same_tokens(model, greedy):
    """The cached prefill and decode run through the unrolled layers too (unroll_layers)."""
    unrolled = nnx.eval_shape(lambda: GlmMoeModel(CONFIG.replace(unroll_layers=True),
                                                  rngs=nnx.Rngs(0)))
    nnx.update(unrolled, nnx.state(model))
    out = generate(unrolled, PROMPTS, max_new_tokens=8, sampling=GREEDY)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)


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
    for bad in (dict(top_p=0.0), dict(temperature=float("nan")), dict(temperature=-1.0),
                dict(top_p=float("inf")), dict(top_k=-2)):
        with pytest.raises(InputError, match="invalid sampling"):
            SamplingConfig(**bad)


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
    with jax.set_mesh(mesh):
        out = generate(placed, PROMPTS, max_new_tokens=8, sampling=GREEDY)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)


def test_mtp_speculative_equals_greedy(model, greedy):
    from glm_jax.infer.speculative import speculative_greedy

    for row, prompt in enumerate(PROMPTS):
        result = speculative_greedy(model, prompt, max_new_tokens=8)
        assert result.tokens == greedy.tokens[row].tolist()
        # One token from the prefill, then per main forward one token plus the accepted draft;
        # the last step may overshoot max_new_tokens by one.
        assert result.drafts == result.main_forwards
        assert 1 + result.main_forwards + result.accepted in (8, 9)


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


def test_log_probs_are_those_of_the_sampled_temperature(model):
    """Sampling at T returns log_softmax(logits / T) of each chosen token (SPEC.md §4b)."""
    hot = SamplingConfig(temperature=1.7)
    out = generate(model, [PROMPTS[0]], max_new_tokens=5, sampling=hot, seeds=[3])
    sequence = np.asarray(PROMPTS[0] + out.tokens[0].tolist(), np.int32)[None]
    steps = np.asarray(model(sequence)[0])[len(PROMPTS[0]) - 1:-1]
    expected = jax.nn.log_softmax(steps / 1.7)[np.arange(5), out.tokens[0]]
    np.testing.assert_allclose(out.logprobs[0], expected, atol=1e-5)


def test_five_requests_compile_prefill_and_decode_once(model):
    """Prompts of 3..60 tokens and 8..40 new tokens share one bucket (prompt width 64, token
    buffer 64, cache 128): one trace of each engine function; greedy still equals the full
    forward."""
    rng = np.random.default_rng(5)
    requests = [(3, 8), (17, 40), (33, 21), (60, 9), (45, 33)]
    traces = dict(engine.TRACES)
    for length, new in requests:
        prompt = rng.integers(0, CONFIG.vocab_size, length).tolist()
        out = generate(model, [prompt, prompt[::-1]], max_new_tokens=new, sampling=GREEDY,
                       stop_tokens=[7] * (new % 3))
        assert out.tokens.shape == (2, new)
        sequence = np.asarray(prompt + out.tokens[0, :out.lengths[0]].tolist(), np.int32)[None]
        logits = np.asarray(model(sequence)[0])[length - 1:-1]
        np.testing.assert_array_equal(out.tokens[0, :out.lengths[0]], logits.argmax(-1))
    for name in ("prefill", "decode"):
        assert engine.TRACES[name] - traces.get(name, 0) <= 1, name


def test_temperature_change_does_not_recompile(model):
    generate(model, [PROMPTS[0]], max_new_tokens=4, sampling=SamplingConfig(temperature=0.9))
    traces = engine.TRACES["decode"]
    for t in (0.5, 1.3):
        generate(model, [PROMPTS[0]], max_new_tokens=4, sampling=SamplingConfig(temperature=t))
    assert engine.TRACES["decode"] == traces


def test_decode_donates_its_cache(model):
    graphdef, state = nnx.split(model)
    ids, valid = engine.left_pad([PROMPTS[0]], 0, 64)
    cache = KVCache.create(CONFIG, 1, 128)
    logits, cache = engine.prefill(graphdef, state, jnp.asarray(ids), cache, jnp.asarray(valid))
    traced = (*GREEDY.traced, jnp.int32(3), jnp.int32(0), engine.stop_array([]))
    engine.decode(graphdef, state, cache, logits, engine.seed_keys([0], 1), traced,
                  GREEDY.static, 64)
    assert cache.k["moe_layers"].is_deleted()  # donated: updated in place, not copied


def test_chat_session_prefills_only_new_tokens(model):
    """Three turns through one session give the replies of fresh generation on the whole
    conversation, while prefilling only what the cache does not already hold."""
    rng = np.random.default_rng(9)
    session = ChatSession(model, sampling=GREEDY)
    conversation, full_lengths = [], 0
    for turn in range(3):
        conversation += rng.integers(0, CONFIG.vocab_size, 5 + turn).tolist()
        reply = session.reply(conversation, max_new_tokens=6)
        fresh = generate(model, [conversation], max_new_tokens=6, sampling=GREEDY)
        assert reply == fresh.tokens[0, :fresh.lengths[0]].tolist()
        full_lengths += len(conversation)
        conversation = conversation + reply
    # Turn 1 prefills its 5 tokens, later turns only their new tokens: the replies were fed
    # back while decoding.
    assert session.prefilled == 5 + 6 + 7 < full_lengths


def test_chat_session_rereads_from_where_the_conversation_diverges(model):
    session = ChatSession(model, sampling=GREEDY)
    first = [11, 12, 13, 14, 15, 16]
    reply = session.reply(first, max_new_tokens=4)
    edited = first[:3] + [99, 98] + reply  # the rendering changed after token 3
    again = session.reply(edited, max_new_tokens=4)
    fresh = generate(model, [edited], max_new_tokens=4, sampling=GREEDY)
    assert again == fresh.tokens[0, :fresh.lengths[0]].tolist()
    assert session.prefilled == len(first) + len(edited) - 3


@pytest.mark.parametrize("prompts, new, message", [
    ([[5, 512, 3]], 4, "token id 512 at position 1 is outside the vocabulary"),
    ([[5, -1]], 4, "token id -1 at position 1 is outside the vocabulary"),
    ([[5] * 1000], 30, "1000 tokens + 30 new exceed max_position_embeddings 1024"),
    ([[5, 6]], 0, "max_new_tokens must be an integer >= 1"),
    ([[5, 6]], -3, "max_new_tokens must be an integer >= 1"),
    ([[]], 3, "every prompt needs at least one token"),
])
def test_bad_generation_input_is_refused(model, prompts, new, message):
    with pytest.raises(InputError, match=re.escape(message)):
        generate(model, prompts, max_new_tokens=new)
    with pytest.raises(InputError, match=re.escape(message)):
        stream(model, prompts[0], max_new_tokens=new)  # at the call, not at the first token


def test_kv_cache_overflow_is_refused(model):
    cache = KVCache.create(CONFIG, 1, 8)
    out, cache = model.forward_cached(jnp.zeros((1, 6), jnp.int32), cache)
    with pytest.raises(InputError, match=re.escape("KV cache overflow: 6 slots used + 3 new > max_length 8")):
        model.forward_cached(jnp.zeros((1, 3), jnp.int32), cache)


def test_mtp_speculative_needs_the_mtp_layer():
    from glm_jax.infer.speculative import speculative_greedy

    no_mtp = GlmMoeModel(CONFIG.replace(num_nextn_predict_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="this model has none"):
        speculative_greedy(no_mtp, PROMPTS[0], max_new_tokens=4)
