"""The GPU (Pallas Triton) gmm backend, run on CPU through the Pallas interpreter.

The kernels are checked against ``kernels.gmm.reference`` through the public
``kernels.gmm`` (forward and its custom VJP) on the cases the masking exists
for: ragged M/K/N, empty groups, a one-row group, rows past sum(group_sizes),
G=1 and many groups. The interpreter cannot compile Triton, so a separate
test lowers the kernels to Triton IR (no GPU needed) at MoE-sized shapes.
"""

import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.gmm import gpu, reference
from jax.experimental.pallas.triton import CUSTOM_CALL_TARGET_NAME

# ``kernels.gmm`` the attribute is the function; the module is in sys.modules.
gmm_pkg = sys.modules["kernels.gmm"]

INTERP = "gpu_interpret"  # heuristic tiles (``gpu._tiles``)
INTERP_32 = "gpu_interpret_32"  # (tm, tk, tn) = (16, 32, 32): K=72, N=40 are ragged
INTERP_16 = "gpu_interpret_16"  # smallest legal tiles: many visits per group


@pytest.fixture(scope="module", autouse=True)
def interpret_backends():
    """Register interpret-mode GPU backends for this module only (one name per tiling,
    since ``kernels.gmm`` jit-caches on the backend name)."""
    tilings = {INTERP: None, INTERP_32: (16, 32, 32), INTERP_16: (16, 16, 16)}
    for name, tiling in tilings.items():
        opts = {"interpret": True, "tiling": tiling}
        gmm_pkg.BACKENDS[name] = gmm_pkg.GmmBackend(
            partial(gpu.gmm, **opts), partial(gpu.tgmm, **opts)
        )
    yield
    for name in tilings:
        del gmm_pkg.BACKENDS[name]


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
    out, dx, dw = got
    tail = int(sum(group_sizes))
    assert not np.asarray(out[tail:], np.float32).any()  # rows past sum(group_sizes)
    assert not np.asarray(dx[tail:], np.float32).any()
    empty = np.asarray(group_sizes) == 0
    assert not np.asarray(dw[empty], np.float32).any()  # empty groups: zero d rhs


def test_direct_kernels_options():
    """transpose_rhs and preferred_element_type behave as the reference reads them."""
    x, w, gs, dy = _inputs(50, 72, 40, [10, 0, 1, 30], jnp.float32)
    gmm_i, tgmm_i = gmm_pkg.BACKENDS[INTERP_32]
    # dy [M, 40] @ w[g]ᵀ: w [G, 72, 40] read as [G, N, K] (the d lhs product).
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


@pytest.mark.parametrize(
    "kind,m,k,n,g,dtype,tiles",
    [
        ("gmm", 65536, 5120, 1536, 160, jnp.bfloat16, (128, 64, 128)),  # training, big groups
        ("gmm", 64, 5120, 1536, 160, jnp.bfloat16, (16, 64, 128)),  # decode: ~1 row per group
        ("gmm", 1000, 72, 40, 8, jnp.float32, (128, 32, 64)),  # f32: tk 32
        ("tgmm", 65536, 5120, 1536, 160, jnp.bfloat16, (64, 128, 128)),
        ("tgmm", 8, 40, 8, 4, jnp.float32, (16, 64, 16)),  # floor of 16
    ],
)
def test_tile_choice(kind, m, k, n, g, dtype, tiles):
    assert gpu._tiles(kind, m, k, n, g, jnp.dtype(dtype)) == tiles


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
    assert gmm_pkg.BACKENDS["gpu"].gmm is gpu.gmm
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert gmm_pkg._auto_backend() == "reference"
