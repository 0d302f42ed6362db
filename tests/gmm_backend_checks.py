"""Shared checks for the gmm backends (tests/test_gmm_gpu.py, tests/test_gmm_tpu.py): register
interpret-mode variants of a Pallas backend, and compare one against the reference."""

import contextlib
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import kernels

# ``kernels.gmm`` the attribute is the function (re-exported by ``kernels``); the module that
# holds BACKENDS is reached through sys.modules.
gmm_pkg = sys.modules["kernels.gmm"]


@contextlib.contextmanager
def interpret_backends(module, tilings: dict):
    """Registers `module`'s gmm/tgmm in interpret mode under each name -> tiling (one name per
    tiling, since ``kernels.gmm`` jit-caches on the backend name), for the `with` block only."""
    for name, tiling in tilings.items():
        opts = {"interpret": True, "tiling": tiling}
        gmm_pkg.BACKENDS[name] = gmm_pkg.GmmBackend(
            partial(module.gmm, **opts), partial(module.tgmm, **opts))
    try:
        yield
    finally:
        for name in tilings:
            del gmm_pkg.BACKENDS[name]


def make_inputs(m, k, n, group_sizes, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(len(group_sizes), k, n)) / np.sqrt(k), dtype)
    dy = jnp.asarray(rng.normal(size=(m, n)), dtype)
    return x, w, jnp.asarray(group_sizes, jnp.int32), dy


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if dtype == jnp.bfloat16:  # both round a float32 sum to bf16: ~1 ulp apart
        scale = max(np.abs(expected).max(), 1.0)
        np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * scale)
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def check_matches_reference(backend, m, k, n, group_sizes, dtype):
    """Forward and both gradients through kernels.gmm's custom VJP equal the reference's; rows
    past sum(group_sizes) and the rhs gradient of empty groups are exactly zero."""
    x, w, gs, dy = make_inputs(m, k, n, group_sizes, dtype)

    def run(name):
        out, vjp = jax.vjp(lambda a, b: kernels.gmm(a, b, gs, backend=name), x, w)
        return (out, *vjp(dy))

    got, want = run(backend), run("reference")
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype)
    out, dx, dw = got
    tail = int(sum(group_sizes))
    assert not np.asarray(out[tail:], np.float32).any()  # rows past sum(group_sizes)
    assert not np.asarray(dx[tail:], np.float32).any()
    empty = np.asarray(group_sizes) == 0
    assert not np.asarray(dw[empty], np.float32).any()  # empty groups: zero d rhs
