"""The TPU (megablox) gmm backend, run on CPU through the Pallas interpreter.

The kernels are checked against ``kernels.gmm.reference`` through the public
``kernels.gmm`` (forward and its custom VJP), on the awkward cases the
wrapper exists for: ragged M/K/N, empty groups, rows past sum(group_sizes).
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.gmm import reference, tpu
from tests import gmm_backend_checks as checks

INTERP = "tpu_interpret"  # default tiling: dims here are all <= 512, so full-dim tiles
INTERP_128 = "tpu_interpret_128"  # 128 tiles: forces M/K/N padding and multi-tile grids


@pytest.fixture(scope="module", autouse=True)
def interpret_backends():
    """Interpret-mode TPU backends for this module only, one name per tiling."""
    with checks.interpret_backends(tpu, {INTERP: tpu.TILING, INTERP_128: (128, 128, 128)}):
        yield


CASES = [
    # (backend, M, K, N, group_sizes, dtype)
    # M, K, N all ragged w.r.t. 128; empty group, group of 1; sum 181 < M.
    (INTERP_128, 200, 200, 72, [60, 0, 1, 120], jnp.float32),
    (INTERP_128, 64, 72, 200, [64], jnp.float32),  # G=1, N padded
    (INTERP_128, 256, 256, 128, [30, 0, 50, 10, 0, 100, 1, 40], jnp.bfloat16),  # G=8
    (INTERP, 100, 200, 72, [0, 37, 0, 50], jnp.float32),  # full-dim tiles, leading empty
    (INTERP, 64, 16, 8, [3, 0, 0, 5, 1, 0, 2, 4] * 4, jnp.float32),  # G=32, sum 60 < 64
]


@pytest.mark.parametrize("backend,m,k,n,group_sizes,dtype", CASES)
def test_forward_and_grads_match_reference(backend, m, k, n, group_sizes, dtype):
    checks.check_matches_reference(backend, m, k, n, group_sizes, dtype)


def test_direct_kernels_options():
    """transpose_rhs and preferred_element_type reach megablox as the reference reads them."""
    x, w, gs, dy = checks.make_inputs(200, 200, 72, [60, 0, 1, 120], jnp.float32)
    gmm_i, tgmm_i = checks.gmm_pkg.BACKENDS[INTERP_128]
    # dy [M, 72] @ w[g]ᵀ: w [G, 200, 72] read as [G, N, K] (the d lhs product).
    checks.assert_close(
        gmm_i(dy, w, gs, preferred_element_type=jnp.float32, transpose_rhs=True),
        reference.gmm(dy, w, gs, preferred_element_type=jnp.float32, transpose_rhs=True),
        jnp.float32,
    )
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    out = gmm_i(xb, wb, gs, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    expected = reference.gmm(xb, wb, gs, preferred_element_type=jnp.float32)
    checks.assert_close(out, expected, jnp.float32)
    with pytest.raises(ValueError, match="num_groups"):
        tgmm_i(x, dy, gs, 3, preferred_element_type=jnp.float32)


def test_maxtext_1183_ragged_k():
    """MaxText issue 1183's repro: K=96 with tk=64, one row per group."""
    key = jax.random.PRNGKey(0)
    x, w = jax.random.normal(key, (32, 96)), jax.random.normal(key, (32, 96, 96))
    gs = jnp.ones(32, jnp.int32)
    out = tpu.gmm(x, w, gs, tiling=(32, 64, 32), interpret=True)
    checks.assert_close(out, reference.gmm(x, w, gs), jnp.float32)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(dim=st.integers(1, 20_000), max_tile=st.sampled_from([128, 256, 512, 1024]))
def test_tiles_are_legal_mosaic_blocks(dim, max_tile):
    """The whole dim when it fits; else a multiple of 128 lanes no larger than max_tile that
    divides dim when any power-of-two fraction of max_tile does (no padding), the largest such;
    else max_tile with the dim padded to it."""
    tile = tpu._tile(dim, max_tile)
    if dim <= max_tile:
        assert tile == dim
        return
    assert tile % 128 == 0 and tile <= max_tile
    dividing = [max_tile >> s for s in range(8) if (max_tile >> s) >= 128 and dim % (max_tile >> s) == 0]
    assert tile == (dividing[0] if dividing else max_tile)
    _, padded = tpu._tiles(dim, dim, dim, (max_tile,) * 3)
    assert padded[0] % tile == 0 and padded[0] - dim < tile


def test_auto_backend_picks_tpu_on_tpu(monkeypatch):
    expected = "tpu" if jax.default_backend() == "tpu" else "reference"
    assert checks.gmm_pkg._auto_backend() == expected
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert checks.gmm_pkg._auto_backend() == "tpu"
