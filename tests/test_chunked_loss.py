"""The chunked cross-entropy equals the full-logits one (loss and gradients, masked positions,
uneven chunks, the main and MTP heads inside the train step) and never holds full logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig
from glm_jax.train.step import (StepConfig, TrainState, chunked_cross_entropy, make_train_step,
                                token_cross_entropy)


def _inputs(b=2, s=13, h=8, v=32):
    kx, kw, kt, km = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(kx, (b, s, h))
    kernel = jax.random.normal(kw, (h, v))
    targets = jax.random.randint(kt, (b, s), 0, v)
    mask = (jax.random.uniform(km, (b, s)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, mask


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_chunked_equals_full_logits(chunk):
    hidden, kernel, targets, mask = _inputs()
    full = lambda x, w: token_cross_entropy(x @ w, targets, mask)
    chunked = lambda x, w: chunked_cross_entropy(lambda y: y @ w, x, targets, mask, chunk)
    want = jax.value_and_grad(full, argnums=(0, 1))(hidden, kernel)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, kernel)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def _temp_bytes(loss, *args):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_backward_never_holds_the_full_logits():
    b, s, h, v = 2, 1024, 64, 32768
    args = jax.ShapeDtypeStruct((b, s, h), jnp.float32), jax.ShapeDtypeStruct((h, v), jnp.float32)
    targets, mask = jnp.zeros((b, s), jnp.int32), jnp.ones((b, s), jnp.float32)
    full = _temp_bytes(lambda x, w: token_cross_entropy(x @ w, targets, mask), *args)
    chunked = _temp_bytes(
        lambda x, w: chunked_cross_entropy(lambda y: y @ w, x, targets, mask, 128), *args)
    assert full >= b * s * v * 4  # at least one [B, S, V] float32 buffer
    assert chunked <= full / 4, (chunked, full)  # measured 77 MB vs 537 MB


def _batch(seq=12, vocab=512):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (2, 2, seq + 1)).astype(np.int32)
    mask = np.ones((2, 2, seq), np.float32)
    mask[0, 0, :5] = 0.0  # a prompt the loss skips
    mask[1, 1, -3:] = 0.0
    return dict(input_ids=ids[..., :-1], target_ids=ids[..., 1:],
                segment_ids=np.array([[1] * 7 + [2] * 5] * 4, np.int32).reshape(2, 2, seq),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (2, 2, seq)),
                loss_mask=mask)


def test_train_step_chunked_equals_full_logits_for_main_and_mtp_heads():
    model = GlmMoeModel(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    optimizer = optax.sgd(0.1)
    results = []
    for chunk in (0, 5):
        graphdef, state = TrainState.create(model, optimizer)
        step = make_train_step(graphdef, optimizer, StepConfig(loss_chunk=chunk), 0.1)
        state, metrics = step(jax.tree.map(jnp.copy, state), _batch())
        results.append((state.params, {k: metrics[k] for k in ("loss", "ce_loss", "mtp_loss")}))
    (params_full, m_full), (params_chunked, m_chunked) = results
    assert m_full["mtp_loss"] > 0
    chex.assert_trees_all_close(m_chunked, m_full, rtol=1e-5)
    chex.assert_trees_all_close(params_chunked, params_full, atol=1e-6)
