"""Tests for kernels/: grouped matmul, routing and expert permutation (reference backends)."""

import re
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kernels
from kernels.gmm import reference as gmm_ref


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh per test, so values do not depend on test order (pytest -n)."""
    return np.random.default_rng(0)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), dtype)


# ----------------------------------------------------------------------------- gmm oracles


def _naive_gmm(x, w, group_sizes) -> np.ndarray:
    """Row-by-row float64 loop: the definition of gmm."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    row = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        for r in range(row, row + size):
            out[r] = x[r] @ w[g]
        row += size
    return out


def _naive_tgmm(x, dy, group_sizes) -> np.ndarray:
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    out = np.zeros((len(group_sizes), x.shape[1], dy.shape[1]))
    row = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[g] = x[row : row + size].T @ dy[row : row + size]
        row += size
    return out


def _dense_gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Differentiable oracle: gather rhs per row ([M, K, N]) and mask tail rows."""
    rows = jnp.arange(x.shape[0])
    row_group = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")  # [M]
    valid = rows < group_sizes.sum()  # [M]
    w_rows = w[jnp.minimum(row_group, w.shape[0] - 1)]  # [M, K, N]
    y = jnp.einsum("mk,mkn->mn", x, w_rows, precision="highest", preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], y, 0).astype(x.dtype)


# ----------------------------------------------------------------------------- gmm forward

GMM_CASES = {
    # name: (group_sizes, M, K, N)
    "empty_and_single_row_groups_with_tail": ([0, 1, 7, 0, 12, 3], 30, 37, 53),
    "one_group_full": ([25], 25, 16, 8),
    "one_group_partial": ([9], 25, 16, 8),
    "all_groups_empty": ([0, 0, 0, 0, 0, 0], 30, 37, 53),
    "many_groups": (list(np.random.default_rng(1).multinomial(180, np.ones(160) / 160)), 200, 8, 6),
    "multi_tile": ([0, 130, 1, 0, 70, 39], 260, 9, 11),  # > 128 rows: several row tiles
}


@pytest.mark.parametrize("case", GMM_CASES)
def test_gmm_matches_naive_loop(case, rng):
    sizes, m, k, n = GMM_CASES[case]
    x, w = _normal(rng, (m, k)), _normal(rng, (len(sizes), k, n))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    y = kernels.gmm(x, w, group_sizes)
    chex.assert_shape(y, (m, n))
    chex.assert_type(y, jnp.float32)
    np.testing.assert_allclose(y, _naive_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
    assert not np.asarray(y[sum(sizes) :]).any(), "rows past sum(group_sizes) must be zero"


def test_gmm_bfloat16_output_dtype_and_values(rng):
    sizes = [3, 0, 17, 6]
    x, w = _normal(rng, (30, 37), jnp.bfloat16), _normal(rng, (4, 37, 53), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    y = kernels.gmm(x, w, gs)
    chex.assert_type(y, jnp.bfloat16)
    expected = _naive_gmm(x, w, sizes)  # exact products of the bf16 inputs
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2, atol=2e-2)
    y32 = kernels.gmm(x, w, gs, preferred_element_type=jnp.float32)
    chex.assert_type(y32, jnp.float32)
    np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-4)  # f32 accumulation


@pytest.mark.parametrize("visits_per_step", [1, 3, 8])
def test_reference_schedules_over_random_group_sizes(rng, visits_per_step):
    """Small row tiles + random sizes exercise tiles shared by several groups,
    groups spanning many tiles, empty groups and partial tails. The schedule has 8 + 7 - 1 = 14
    visits, so 3 or 8 per step leave the last step partly padding."""
    m, k, n, g, tile_m = 61, 5, 4, 7, 8
    fwd = jax.jit(lambda x, w, gs: gmm_ref.gmm(x, w, gs, tile_m=tile_m,
                                               visits_per_step=visits_per_step))
    bwd = jax.jit(lambda x, dy, gs: gmm_ref.tgmm(x, dy, gs, g, tile_m=tile_m,
                                                 visits_per_step=visits_per_step))
    x, w, dy = _normal(rng, (m, k)), _normal(rng, (g, k, n)), _normal(rng, (m, n))
    for _ in range(25):
        total = rng.integers(0, m + 1)
        sizes = rng.multinomial(total, rng.dirichlet(np.full(g, 0.3)))
        gs = jnp.asarray(sizes, jnp.int32)
        np.testing.assert_allclose(fwd(x, w, gs), _naive_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bwd(x, dy, gs), _naive_tgmm(x, dy, sizes), rtol=1e-5, atol=1e-5)


def test_tgmm_bfloat16_output_is_rounded_once_and_needs_no_float32_accumulator(rng):
    """A group spanning many tiles sums in float32 and is rounded to bfloat16 once (the same
    bits as the float32 result cast), and no float32 [G, K, N] is ever allocated."""
    g, k, n = 16, 256, 256
    sizes = jnp.asarray([0, 40, 3, 0, 200, 1, 9, 0, 17, 60, 5, 0, 2, 33, 11, 131], jnp.int32)
    x = _normal(rng, (512, k)).astype(jnp.bfloat16)
    dy = _normal(rng, (512, n)).astype(jnp.bfloat16)
    tgmm = jax.jit(partial(gmm_ref.tgmm, tile_m=32), static_argnames="preferred_element_type")
    out16 = tgmm(x, dy, sizes, preferred_element_type=jnp.bfloat16)
    out32 = tgmm(x, dy, sizes, preferred_element_type=jnp.float32)
    chex.assert_type(out16, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out16, np.float32),
                                  np.asarray(out32.astype(jnp.bfloat16), np.float32))
    temp = tgmm.lower(x, dy, sizes, preferred_element_type=jnp.bfloat16).compile() \
        .memory_analysis().temp_size_in_bytes
    assert temp < g * k * n * 4 / 2, temp  # a float32 [G, K, N] accumulator is g * k * n * 4


def test_tgmm_matches_ragged_dot_general(rng):
    """Cross-check against XLA's own ragged contraction (ragged M, output [G, K, N])."""
    sizes = jnp.asarray([4, 0, 1, 20, 2], jnp.int32)
    x, dy = _normal(rng, (31, 37)), _normal(rng, (31, 53))
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    expected = jax.lax.ragged_dot_general(x, dy, sizes, dims, precision="highest")
    np.testing.assert_allclose(gmm_ref.tgmm(x, dy, sizes, 5), expected, rtol=1e-5, atol=1e-5)


def test_gmm_under_jit_with_traced_group_sizes(rng):
    x, w = _normal(rng, (20, 6)), _normal(rng, (3, 6, 5))
    f = jax.jit(kernels.gmm)
    for sizes in ([20, 0, 0], [0, 0, 20], [5, 5, 5]):
        np.testing.assert_allclose(
            f(x, w, jnp.asarray(sizes, jnp.int32)), _naive_gmm(x, w, sizes), rtol=1e-5, atol=1e-5
        )


# ----------------------------------------------------------------------------- gmm gradients


def _vjp(f, x, w, dy):
    """(d x, d w) of f at (x, w) for cotangent dy, compiled as one program."""
    return jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))(x, w, dy)


@pytest.mark.parametrize(
    ("dtype", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)], ids=["f32", "bf16"]
)
def test_gmm_grads_match_dense_masked(dtype, tol, rng):
    sizes = [5, 0, 1, 11, 0]  # 23 of 30 rows: 7 tail rows; groups 1 and 4 empty
    gs = jnp.asarray(sizes, jnp.int32)
    x, w = _normal(rng, (30, 37), dtype), _normal(rng, (5, 37, 53), dtype)
    dy = _normal(rng, (30, 53), dtype)

    dx, dw = _vjp(lambda a, b: kernels.gmm(a, b, gs), x, w, dy)
    # Oracle in float32 on the same (rounded) inputs: the kernel accumulates in f32.
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dx_ref, dw_ref = _vjp(lambda a, b: _dense_gmm(a, b, gs), f32(x), f32(w), f32(dy))

    chex.assert_type([dx, dw], dtype)
    chex.assert_trees_all_close((f32(dx), f32(dw)), (dx_ref, dw_ref), rtol=tol, atol=tol)
    assert not np.asarray(dx[sum(sizes) :]).any(), "tail rows must get zero gradient"
    assert not np.asarray(dw[jnp.asarray([1, 4])]).any(), "empty groups must get zero gradient"


def test_gmm_grads_with_float32_output_from_bfloat16_inputs(rng):
    gs = jnp.asarray([3, 9], jnp.int32)
    x, w = _normal(rng, (14, 6), jnp.bfloat16), _normal(rng, (2, 6, 4), jnp.bfloat16)
    dy = _normal(rng, (14, 4))  # float32 cotangent of the float32 output
    dx, dw = _vjp(lambda a, b: kernels.gmm(a, b, gs, preferred_element_type=jnp.float32), x, w, dy)
    chex.assert_type([dx, dw], jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    dx_ref, dw_ref = _vjp(lambda a, b: _dense_gmm(a, b, gs), f32(x), f32(w), dy)
    chex.assert_trees_all_close((f32(dx), f32(dw)), (dx_ref, dw_ref), rtol=2e-2, atol=2e-2)


def test_gmm_check_grads_numerically(rng):
    gs = jnp.asarray([2, 0, 4, 1], jnp.int32)  # 7 of 9 rows
    x, w = _normal(rng, (9, 5)), _normal(rng, (4, 5, 3))
    check_grads(lambda a, b: kernels.gmm(a, b, gs), (x, w), order=1, modes=["rev"])


def test_gmm_group_sizes_get_no_gradient(rng):
    gs = jnp.asarray([2, 0, 4, 1], jnp.int32)
    x, w = _normal(rng, (9, 5)), _normal(rng, (4, 5, 3))
    _, vjp = jax.vjp(lambda a, b, g: kernels.gmm(a, b, g), x, w, gs)
    dgs = vjp(_normal(rng, (9, 3)))[2]
    assert dgs.dtype == jax.dtypes.float0


# ----------------------------------------------------------------------------- gmm errors


@pytest.mark.parametrize(
    ("lhs", "rhs", "gs", "kwargs", "match"),
    [
        ((4, 5), (2, 6, 3), (2,), {}, "K mismatch"),
        ((4, 5, 1), (2, 5, 3), (2,), {}, "lhs must be 2-D"),
        ((4, 5), (5, 3), (2,), {}, "rhs must be 3-D"),
        ((4, 5), (2, 5, 3), (3,), {}, "group_sizes must have shape"),
        ((4, 5), (2, 5, 3), (2,), {"backend": "cuda"}, "unknown gmm backend 'cuda'.*reference"),
    ],
)
def test_gmm_rejects_bad_inputs(lhs, rhs, gs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.gmm(jnp.zeros(lhs), jnp.zeros(rhs), jnp.zeros(gs, jnp.int32), **kwargs)


def test_gmm_rejects_float_group_sizes():
    with pytest.raises(ValueError, match="group_sizes must be integer"):
        kernels.gmm(jnp.zeros((4, 5)), jnp.zeros((2, 5, 3)), jnp.zeros(2))


# ----------------------------------------------------------------------------- routing


def _np_topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest, lowest index first among equals."""
    return np.argsort(-x, kind="stable")[:k]


def _naive_route(logits, bias, top_k, n_group, topk_group, norm, scale):
    logits, bias = np.asarray(logits, np.float32), np.asarray(bias, np.float32)
    num_tokens, num_experts = logits.shape
    group_size = num_experts // n_group
    scores = 1 / (1 + np.exp(-logits))
    weights = np.zeros((num_tokens, top_k), np.float32)
    ids = np.zeros((num_tokens, top_k), np.int32)
    for t in range(num_tokens):
        choice = scores[t] + bias
        groups = choice.reshape(n_group, group_size)
        group_scores = np.sort(groups, axis=1)[:, ::-1][:, :2].sum(1)
        masked = np.full(num_experts, -np.inf, np.float32)
        for g in _np_topk(group_scores, topk_group):
            masked[g * group_size : (g + 1) * group_size] = groups[g]
        ids[t] = _np_topk(masked, top_k)
        weights[t] = scores[t, ids[t]]
        if norm:
            weights[t] /= weights[t].sum() + 1e-20
    return weights * scale, ids


ROUTE_CONFIGS = {
    # name: (E, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
    "single_group": (16, 4, 1, 1, True, 1.0),
    "grouped_norm_scaled": (32, 4, 4, 2, True, 2.5),
    "grouped_no_norm": (32, 6, 4, 2, False, 1.0),
    "grouped_no_norm_scaled": (64, 8, 8, 3, False, 2.5),
    "one_expert_per_group": (8, 2, 8, 3, True, 1.0),
}


@pytest.mark.parametrize("config", ROUTE_CONFIGS)
def test_route_matches_numpy(config, rng):
    num_experts, top_k, n_group, topk_group, norm, scale = ROUTE_CONFIGS[config]
    logits, bias = 2 * _normal(rng, (24, num_experts)), 0.3 * _normal(rng, (num_experts,))
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group)
    weights, ids, tokens_per_expert = kernels.route(
        logits, bias, **kw, norm_topk_prob=norm, routed_scaling_factor=scale
    )
    w_ref, ids_ref = _naive_route(logits, bias, top_k, n_group, topk_group, norm, scale)
    chex.assert_type([weights, ids, tokens_per_expert], [jnp.float32, jnp.int32, jnp.int32])
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(weights, w_ref, rtol=1e-6, atol=1e-7)
    counts = np.bincount(ids_ref.ravel(), minlength=num_experts)
    np.testing.assert_array_equal(tokens_per_expert, counts)
    assert int(tokens_per_expert.sum()) == 24 * top_k


def test_route_bias_steers_selection_but_not_weights(rng):
    logits = _normal(rng, (10, 16))
    bias = jnp.zeros(16).at[jnp.asarray([3, 11])].set(100.0)
    kw = dict(top_k=2, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.0)
    weights, ids, _ = kernels.route(logits, bias, **kw)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile([3, 11], (10, 1)))
    unbiased = jax.nn.sigmoid(jnp.take_along_axis(logits, ids, 1))
    np.testing.assert_allclose(weights, unbiased, rtol=1e-6)
    assert float(weights.max()) < 1.0, "weights must be unbiased sigmoid scores"


def test_route_negative_biased_scores_stay_in_kept_groups(rng):
    """Dropped groups are masked with -inf (not 0), so they lose even to negative scores."""
    best_group = rng.integers(0, 4, size=16)  # [T]
    in_best = np.arange(16) // 4 == best_group[:, None]  # [T, E]
    logits = jnp.asarray(np.where(in_best, 2.0, -2.0) + 0.1 * rng.normal(size=(16, 16)))
    kw = dict(top_k=2, n_group=4, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    _, ids, _ = kernels.route(logits, jnp.full(16, -5.0), **kw)
    np.testing.assert_array_equal(np.asarray(ids) // 4, np.stack([best_group] * 2, axis=1))


def test_route_casts_bfloat16_logits_to_float32(rng):
    logits, bias = _normal(rng, (8, 16), jnp.bfloat16), _normal(rng, (16,))
    kw = dict(top_k=3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    got = kernels.route(logits, bias, **kw)
    chex.assert_type(got[0], jnp.float32)
    chex.assert_trees_all_equal(got, kernels.route(logits.astype(jnp.float32), bias, **kw))


def test_route_weights_are_differentiable_in_logits(rng):
    logits, bias = _normal(rng, (4, 16)), 0.1 * _normal(rng, (16,))
    kw = dict(top_k=3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    check_grads(lambda lg: kernels.route(lg, bias, **kw)[0], (logits,), order=1, modes=["rev"])


def test_route_ties_pick_lowest_ids():
    kw = dict(norm_topk_prob=True, routed_scaling_factor=1.0)
    flat = jnp.zeros((2, 16))
    _, ids, _ = kernels.route(flat, jnp.zeros(16), top_k=3, n_group=1, topk_group=1, **kw)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [0, 1, 2]])
    # All groups tie too: groups 0 and 1 are kept, so ids stay the lowest ones.
    _, ids, _ = kernels.route(flat, jnp.zeros(16), top_k=6, n_group=4, topk_group=2, **kw)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3, 4, 5]] * 2)
    # A tie for the best score between experts 9 and 5: 5 first, then 9.
    logits = jnp.zeros((1, 16)).at[0, jnp.asarray([9, 5])].set(3.0)
    _, ids, _ = kernels.route(logits, jnp.zeros(16), top_k=3, n_group=1, topk_group=1, **kw)
    np.testing.assert_array_equal(ids, [[5, 9, 0]])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(top_k=9, n_group=4, topk_group=2), "top_k=9 must be in \\[1, 8\\]"),
        (dict(top_k=2, n_group=3, topk_group=1), "n_group=3 must divide"),
        (dict(top_k=2, n_group=4, topk_group=5), "topk_group=5"),
        (dict(top_k=2, n_group=4, topk_group=2, backend="tpu"), "unknown route backend 'tpu'"),
    ],
)
def test_route_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.route(
            jnp.zeros((3, 16)),
            jnp.zeros(16),
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            **kwargs,
        )


def test_route_rejects_bias_shape():
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.route(
            jnp.zeros((3, 16)),
            jnp.zeros(8),
            top_k=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
        )


# ----------------------------------------------------------------------------- permutation


def test_sort_by_expert_is_stable_and_groups_rows():
    expert_ids = jnp.asarray([[2, 0], [0, 2], [1, 2], [2, 0]], jnp.int32)  # T=4, k=2
    s = kernels.sort_by_expert(expert_ids, num_experts=4)
    # Expert 0: flat 1, 2, 7; expert 1: flat 4; expert 2: flat 0, 3, 5, 6 (token order).
    np.testing.assert_array_equal(s.order, [1, 2, 7, 4, 0, 3, 5, 6])
    np.testing.assert_array_equal(s.token_index, [0, 1, 3, 2, 0, 1, 2, 3])
    np.testing.assert_array_equal(s.group_sizes, [3, 1, 4, 0])
    chex.assert_type([s.order, s.token_index, s.group_sizes], jnp.int32)


def test_unsort_inverts_sort_and_has_gather_gradient(rng):
    expert_ids = jnp.asarray(rng.integers(0, 6, size=(9, 3)), jnp.int32)
    s = kernels.sort_by_expert(expert_ids, num_experts=6)
    y = _normal(rng, (27, 5))  # one row per (token, slot)
    y_sorted = y[s.order]
    np.testing.assert_array_equal(kernels.unsort(y_sorted, s.order, 3), y.reshape(9, 3, 5))
    cot = _normal(rng, (9, 3, 5))
    (grad,) = jax.vjp(lambda v: kernels.unsort(v, s.order, 3), y_sorted)[1](cot)
    np.testing.assert_array_equal(grad, cot.reshape(27, 5)[s.order])
    backward = jax.jit(lambda v, c: jax.vjp(lambda v: kernels.unsort(v, s.order, 3), v)[1](c))
    hlo = backward.lower(y_sorted, cot).compile().as_text()
    assert not re.search(r"f32\[[^\]]*\][^\n]*scatter\(", hlo)  # no float scatter-add


def test_route_sort_gmm_unsort_equals_per_token_experts(rng):
    """The MoE data path the kernels exist for, against a per-token loop."""
    num_tokens, num_experts, top_k, d, f = 12, 8, 2, 6, 5
    x, w = _normal(rng, (num_tokens, d)), _normal(rng, (num_experts, d, f))
    logits = _normal(rng, (num_tokens, num_experts))
    weights, ids, tokens_per_expert = kernels.route(
        logits, jnp.zeros(num_experts), top_k=top_k, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0,
    )
    s = kernels.sort_by_expert(ids, num_experts)
    np.testing.assert_array_equal(s.group_sizes, tokens_per_expert)
    y = kernels.unsort(kernels.gmm(x[s.token_index], w, s.group_sizes), s.order, top_k)  # [T, k, F]
    out = (y * weights[..., None]).sum(1)
    ids_np, w_np = np.asarray(ids), np.asarray(weights)
    expected = np.stack([
        sum(w_np[t, j] * np.asarray(x[t]) @ np.asarray(w[ids_np[t, j]]) for j in range(top_k))
        for t in range(num_tokens)
    ])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
