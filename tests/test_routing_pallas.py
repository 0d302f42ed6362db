"""The fused Pallas router (interpret mode on CPU) against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kernels
from kernels.routing import pallas, reference

CONFIGS = {
    # name: (E, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    "single_group": (8, 2, 1, 1, True, 1.0),
    "grouped": (16, 4, 4, 2, True, 2.5),
    "grouped_no_norm": (16, 3, 4, 2, False, 1.0),
    "glm45": (160, 8, 1, 1, True, 2.5),
    "glm45_air": (128, 8, 1, 1, True, 1.0),
    "non_power_of_two": (6, 3, 3, 2, False, 2.5),
    "one_expert_per_group": (8, 2, 8, 3, True, 1.0),
}


def _route(logits, bias, **kw):
    return pallas.route(logits, bias, **kw, interpret=True)


def _assert_matches_reference(logits, bias, **kw):
    weights, ids, counts = _route(logits, bias, **kw)
    w_ref, ids_ref, counts_ref = reference.route(logits, bias, **kw)
    assert (weights.dtype, ids.dtype, counts.dtype) == (jnp.float32, jnp.int32, jnp.int32)
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(weights, w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(counts, counts_ref)


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(config):
    num_experts, top_k, n_group, topk_group, norm, scale = CONFIGS[config]
    rng = np.random.default_rng(0)
    # 37 tokens: not a multiple of the 32-token tile, so the last tile is padded.
    logits = jnp.asarray(2 * rng.normal(size=(37, num_experts)), jnp.float32)
    bias = jnp.asarray(0.3 * rng.normal(size=num_experts), jnp.float32)
    _assert_matches_reference(
        logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=scale,
    )


def test_bfloat16_logits_and_small_tile():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(50, 16)), jnp.bfloat16)
    bias = jnp.asarray(0.1 * rng.normal(size=16), jnp.float32)
    kw = dict(top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    _assert_matches_reference(logits, bias, **kw)
    np.testing.assert_array_equal(
        pallas.route(logits, bias, **kw, token_tile=16, interpret=True)[1],
        _route(logits, bias, **kw)[1],
    )


def test_ties_pick_lowest_ids():
    """Ties between experts and between groups both go to the lowest index."""
    kw = dict(norm_topk_prob=True, routed_scaling_factor=1.0)
    flat = jnp.zeros((2, 16))
    _, ids, _ = _route(flat, jnp.zeros(16), top_k=3, n_group=1, topk_group=1, **kw)
    np.testing.assert_array_equal(ids, [[0, 1, 2]] * 2)
    _, ids, _ = _route(flat, jnp.zeros(16), top_k=6, n_group=4, topk_group=2, **kw)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4, 5]] * 2)
    # Experts 9 and 5 tie for best: 5 first, then 9, then the lowest of the rest.
    logits = jnp.zeros((1, 16)).at[0, jnp.asarray([9, 5])].set(3.0)
    _, ids, _ = _route(logits, jnp.zeros(16), top_k=3, n_group=1, topk_group=1, **kw)
    np.testing.assert_array_equal(ids, [[5, 9, 0]])
    # Groups 3 and 1 tie (both hold a 3.0 pair), group 1 is kept; a tied
    # top-2 pair inside a group counts twice, not once.
    logits = jnp.zeros((1, 16)).at[0, jnp.asarray([4, 5, 12, 13])].set(3.0)
    _, ids, _ = _route(logits, jnp.zeros(16), top_k=3, n_group=4, topk_group=1, **kw)
    np.testing.assert_array_equal(ids, [[4, 5, 6]])


def test_registered_backend_and_gradient():
    """``kernels.route(backend="pallas")`` reaches the kernel (interpreted on
    CPU) and its weights have the reference's gradient in the logits."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.normal(size=16), jnp.float32)
    kw = dict(top_k=3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    got = kernels.route(logits, bias, **kw, backend="pallas")
    want = kernels.route(logits, bias, **kw, backend="reference")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    check_grads(lambda lg: kernels.route(lg, bias, **kw, backend="pallas")[0], (logits,),
                order=1, modes=["rev"])
    grad = jax.grad(lambda lg, b: kernels.route(lg, b, **kw, backend="pallas")[0].sum(),
                    argnums=(0, 1))
    ref_grad = jax.grad(lambda lg, b: reference.route(lg, b, **kw)[0].sum(), argnums=(0, 1))
    for g, w in zip(grad(logits, bias), ref_grad(logits, bias), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


def test_rejects_bad_token_tile():
    with pytest.raises(ValueError, match="token_tile=24"):
        pallas.route(jnp.zeros((4, 8)), jnp.zeros(8), top_k=2, n_group=1, topk_group=1,
                     norm_topk_prob=True, routed_scaling_factor=1.0, token_tile=24)
