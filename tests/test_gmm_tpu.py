"""The TPU (megablox) gmm backend, run on CPU through the Pallas interpreter.

The kernels are checked against ``kernels.gmm.reference`` through the public
``kernels.gmm`` (forward and its custom VJP), on the awkward cases the
wrapper exists for: ragged M/K/N, empty groups, rows past sum(group_sizes).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sys

import kernels
from kernels.gmm import reference, tpu

# ``kernels.gmm`` the attribute is the function (re-exported by ``kernels``);
# the module that holds BACKENDS is reached through sys.modules.
gmm_pkg = sys.modules["kernels.gmm"]

INTERP = "tpu_interpret"  # default tiling: dims here are all <= 512, so full-dim tiles
INTERP_128 = "tpu_interpret_128"  # 128 tiles: forces M/K/N padding and multi-tile grids


@pytest.fixture(scope="module", autouse=True)
def interpret_backends():
    """Register interpret-mode TPU backends for this module only.

    Each tiling gets its own name because ``kernels.gmm`` jit-caches on it.
    """
    for name, tiling in ((INTERP, tpu.TILING), (INTERP_128, (128, 128, 128))):
        opts = {"interpret": True, "tiling": tiling}
        gmm_pkg.BACKENDS[name] = gmm_pkg.GmmBackend(
            partial(tpu.gmm, **opts), partial(tpu.tgmm, **opts)
        )
    yield
    for name in (INTERP, INTERP_128):
        del gmm_pkg.BACKENDS[name]


CASES = [
    # (backend, M, K, N, group_sizes, dtype)
    # M, K, N all ragged w.r.t. 128; empty group, group of 1; sum 181 < M.
    (INTERP_128, 200, 200, 72, [60, 0, 1, 120], jnp.float32),
    (INTERP_128, 64, 72, 200, [64], jnp.float32),  # G=1, N padded
    (INTERP_128, 256, 256, 128, [30, 0, 50, 10, 0, 100, 1, 40], jnp.bfloat16),  # G=8
    (INTERP, 100, 200, 72, [0, 37, 0, 50], jnp.float32),  # full-dim tiles, leading empty
    (INTERP, 64, 16, 8, [3, 0, 0, 5, 1, 0, 2, 4] * 4, jnp.float32),  # G=32, sum 60 < 64
]


def _inputs(m, k, n, group_sizes, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.normal(size=(m, n)), dtype)
    return x, w, jnp.asarray(group_sizes, jnp.int32), dy


def _assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if dtype == jnp.bfloat16:  # both round a float32 sum to bf16: ~1 ulp apart
        scale = max(np.abs(expected).max(), 1.0)
        np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,m,k,n,group_sizes,dtype", CASES)
def test_forward_and_grads_match_reference(backend, m, k, n, group_sizes, dtype):
    x, w, gs, dy = _inputs(m, k, n, group_sizes, dtype)

    def run(name):
        out, vjp = jax.vjp(lambda a, b: kernels.gmm(a, b, gs, backend=name), x, w)
        return (out, *vjp(dy))

    got, want = run(backend), run("reference")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        _assert_close(a, b, dtype)
    out, dx, _ = got
    tail = int(sum(group_sizes))
    assert not np.asarray(out[tail:], np.float32).any()  # rows past sum(group_sizes)
    assert not np.asarray(dx[tail:], np.float32).any()


def test_direct_kernels_options():
    """transpose_rhs and preferred_element_type reach megablox as the reference reads them."""
    x, w, gs, dy = _inputs(200, 200, 72, [60, 0, 1, 120], jnp.float32)
    gmm_i, tgmm_i = gmm_pkg.BACKENDS[INTERP_128]
    # dy [M, 72] @ w[g]ᵀ: w [G, 200, 72] read as [G, N, K] (the d lhs product).
    _assert_close(
        gmm_i(dy, w, gs, preferred_element_type=jnp.float32, transpose_rhs=True),
        reference.gmm(dy, w, gs, preferred_element_type=jnp.float32, transpose_rhs=True),
        jnp.float32,
    )
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = gmm_i(xb, wb, gs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    _assert_close(out, reference.gmm(xb, wb, gs, preferred_element_type=jnp.float32), jnp.float32)
    with pytest.raises(ValueError, match="num_groups"):
        tgmm_i(x, dy, gs, 3, preferred_element_type=jnp.float32)


def test_maxtext_1183_ragged_k():
    """MaxText issue 1183's repro: K=96 with tk=64, one row per group."""
    key = jax.random.PRNGKey(0)
    x, w = jax.random.normal(key, (32, 96)), jax.random.normal(key, (32, 96, 96))
    gs = jnp.ones(32, jnp.int32)
    out = tpu.gmm(x, w, gs, tiling=(32, 64, 32), interpret=True)
    _assert_close(out, reference.gmm(x, w, gs), jnp.float32)


@pytest.mark.parametrize(
    "dim,max_tile,tile",
    [(72, 128, 72), (128, 128, 128), (200, 128, 128), (1536, 512, 512), (1280, 512, 256),
     (640, 512, 128), (700, 512, 512)],
)
def test_tile_choice(dim, max_tile, tile):
    """Whole dim if it fits, else a dividing 128-multiple, else max_tile (and pad)."""
    assert tpu._tile(dim, max_tile) == tile


def test_auto_backend_picks_tpu_on_tpu(monkeypatch):
    expected = "tpu" if jax.default_backend() == "tpu" else "reference"
    assert gmm_pkg._auto_backend() == expected
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert gmm_pkg._auto_backend() == "tpu"
