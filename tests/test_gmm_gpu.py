"""The GPU (Pallas Triton) gmm backend, run on CPU through the Pallas interpreter.

The kernels are checked against ``kernels.gmm.reference`` through the public
``kernels.gmm`` (forward and its custom VJP) on the cases the masking exists
for: ragged M/K/N, empty groups, a one-row group, rows past sum(group_sizes),
G=1 and many groups. The interpreter cannot compile Triton, so a separate
test lowers the kernels to Triton IR (no GPU needed) at MoE-sized shapes.
"""

from functools import partial

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas.triton import CUSTOM_CALL_TARGET_NAME

from kernels.gmm import gpu, reference
from tests import gmm_backend_checks as checks

INTERP = "gpu_interpret"  # heuristic tiles (``gpu._tiles``)
INTERP_32 = "gpu_interpret_32"  # (tm, tk, tn) = (16, 32, 32): K=72, N=40 are ragged
INTERP_16 = "gpu_interpret_16"  # smallest legal tiles: many visits per group


@pytest.fixture(scope="module", autouse=True)
def interpret_backends():
    """Interpret-mode GPU backends for this module only, one name per tiling."""
    tilings = {INTERP: None, INTERP_32: (16, 32, 32), INTERP_16: (16, 16, 16)}
    with checks.interpret_backends(gpu, tilings):
        yield


_G160 = [0, 3, 1, 0, 2] * 32  # 160 groups, sum 192 < M

CASES = [
    # (backend, M, K, N, group_sizes, dtype)
    # Ragged K and N; empty group, one-row group; sum 41 < M; tiles shared by groups.
    (INTERP_32, 50, 72, 40, [10, 0, 1, 30], jnp.float32),
    (INTERP_32, 50, 72, 40, [0, 17, 1, 0, 25], jnp.bfloat16),  # leading empty group
    (INTERP, 32, 24, 16, [32], jnp.float32),  # G=1, heuristic tiles
    (INTERP_16, 64, 16, 16, [3, 0, 0, 5, 1, 0, 2, 4] * 4, jnp.float32),  # G=32, sum 60
    (INTERP, 200, 16, 16, _G160, jnp.bfloat16),  # G=160 (the GLM-4.5 expert count)
    (INTERP_16, 16, 16, 16, [0, 0], jnp.float32),  # every group empty
]


@pytest.mark.parametrize("backend,m,k,n,group_sizes,dtype", CASES)
def test_forward_and_grads_match_reference(backend, m, k, n, group_sizes, dtype):
    checks.check_matches_reference(backend, m, k, n, group_sizes, dtype)


def test_direct_kernels_options():
    """transpose_rhs and preferred_element_type behave as the reference reads them."""
    x, w, gs, dy = checks.make_inputs(50, 72, 40, [10, 0, 1, 30], jnp.float32)
    gmm_i, tgmm_i = checks.gmm_pkg.BACKENDS[INTERP_32]
    # dy [M, 40] @ w[g]ᵀ: w [G, 72, 40] read as [G, N, K] (the d lhs product).
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


@settings(max_examples=200, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["gmm", "tgmm"]), m=st.integers(1, 1 << 17),
       k=st.integers(1, 8192), n=st.integers(1, 8192), g=st.integers(1, 256),
       wide=st.booleans())
def test_tiles_are_legal_triton_blocks(kind, m, k, n, g, wide):
    """Whatever the heuristic picks: power-of-two blocks of at least 16 (what Triton's dot
    needs), never larger than 128 nor than the dimension rounded up to a power of two (so a
    tile never overhangs a whole extra power of two), and gmm's row tile no larger than the
    mean group rounded up (smaller groups would waste most of every visit)."""
    tiles = gpu._tiles(kind, m, k, n, g, jnp.dtype(jnp.float32 if wide else jnp.bfloat16))
    pow2 = lambda d: 1 << max(d - 1, 0).bit_length()
    for tile, dim in zip(tiles, (m, k, n)):
        assert tile >= 16 and tile & (tile - 1) == 0 and tile <= 128
        assert tile <= max(16, pow2(dim))
    if kind == "gmm":
        assert tiles[0] <= max(16, pow2(-(-m // g)))


def test_lowers_to_triton(monkeypatch):
    """The kernels lower to Triton IR at GLM-4.5 MoE shapes with heuristic tiles.

    Lowering needs only the GPU's compute capability, faked here as an H100
    through a private jax hook; compiling the IR to PTX still needs a GPU.
    """
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100)
    m, k, n, g = 4096, 5120, 1536, 160
    lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((g,), jnp.int32)
    for fn, args in (
        (gpu.gmm, (lhs, rhs, gs)),
        (partial(gpu.gmm, transpose_rhs=True), (dy, rhs, gs)),
        (gpu.tgmm, (lhs, dy, gs)),
    ):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert CUSTOM_CALL_TARGET_NAME in text


def test_gpu_backend_is_registered_but_not_yet_the_default(monkeypatch):
    """Until verified on an H100, GPU runs pick the reference; the kernels are opt-in."""
    assert checks.gmm_pkg.BACKENDS["gpu"].gmm is gpu.gmm
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert checks.gmm_pkg._auto_backend() == "reference"
