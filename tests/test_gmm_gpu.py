"""The GPU gmm backend (tokamax per direction, then lax.ragged_dot, then the reference), on CPU.

tokamax's "xla" implementation runs on CPU, so the whole dispatch -- kernels.gmm's custom VJP
calling ``gpu.gmm`` (forward, d lhs) and ``gpu.tgmm`` (d rhs), each direction picking its
implementation -- is checked here against ``kernels.gmm.reference``, values and gradients, on
the cases the masking exists for: ragged dims, empty groups, a one-row group, rows past
sum(group_sizes), G=1 and many groups. The Mosaic / Triton kernels themselves need a GPU
(``python -m experiments bench --what=gmm`` there); here they only show up as refusals the
fallback chain must survive.
"""

import logging
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.gmm import gpu, reference
from tests import gmm_backend_checks as checks

XLA = "tokamax_xla"  # every direction on tokamax's "xla" implementation
BOGUS = "tokamax_bogus"  # an implementation tokamax does not have: the lax fallback runs

_G160 = [0, 3, 1, 0, 2] * 32  # 160 groups, sum 192 < M

CASES = [
    # (M, K, N, group_sizes, dtype)
    (50, 72, 40, [10, 0, 1, 30], jnp.float32),  # empty and one-row groups; sum 41 < M
    (50, 72, 40, [0, 17, 1, 0, 25], jnp.bfloat16),  # leading empty group
    (32, 24, 16, [32], jnp.float32),  # G=1, every row in a group
    (64, 16, 16, [3, 0, 0, 5, 1, 0, 2, 4] * 4, jnp.float32),  # G=32, sum 60 < M
    (200, 16, 16, _G160, jnp.bfloat16),  # G=160 (the GLM-4.5 expert count)
    (16, 16, 16, [0, 0], jnp.float32),  # every group empty
]


@pytest.fixture
def tokamax_backends():
    """Registers the tokamax-backed gmm with fixed implementations, for one test only."""
    pytest.importorskip("tokamax")
    gmm_pkg = checks.gmm_pkg
    for name, impl in ((XLA, "xla"), (BOGUS, ("bogus",))):
        gmm_pkg.BACKENDS[name] = gmm_pkg.GmmBackend(
            partial(gpu.gmm, implementation=impl), partial(gpu.tgmm, implementation=impl))
    jax.clear_caches()  # kernels.gmm is jit-cached on the backend name
    yield
    for name in (XLA, BOGUS):
        del gmm_pkg.BACKENDS[name]
    jax.clear_caches()


@pytest.mark.parametrize("m,k,n,group_sizes,dtype", CASES)
def test_tokamax_xla_forward_and_grads_match_reference(tokamax_backends, m, k, n, group_sizes,
                                                       dtype):
    checks.check_matches_reference(XLA, m, k, n, group_sizes, dtype)


def test_jax_grad_in_lhs_and_rhs_matches_reference(tokamax_backends):
    """jax.grad of a nonlinear loss, both arguments, against the reference; the tail rows
    (sum 41 of 50) get exactly zero gradient and the empty group's weights too."""
    x, w, gs, _ = checks.make_inputs(50, 72, 40, [10, 0, 1, 30], jnp.float32)

    def loss(a, b, name):
        return jnp.sum(jnp.tanh(kernels.gmm(a, b, gs, backend=name)) ** 2)

    got = jax.grad(loss, argnums=(0, 1))(x, w, XLA)
    want = jax.grad(loss, argnums=(0, 1))(x, w, "reference")
    for a, b in zip(got, want, strict=True):
        checks.assert_close(a, b, jnp.float32)
    assert not np.asarray(got[0][41:]).any() and not np.asarray(got[1][1]).any()


def test_bfloat16_inputs_float32_output(tokamax_backends):
    """preferred_element_type=float32 from bf16 operands: the backward's float32 dy meets
    bf16 weights (promoted), and the cotangents come back in the operands' dtypes."""
    x, w, gs, dy = checks.make_inputs(50, 72, 40, [10, 0, 1, 30], jnp.bfloat16)

    def run(name):
        fn = lambda a, b: kernels.gmm(a, b, gs, backend=name, preferred_element_type=jnp.float32)
        out, vjp = jax.vjp(fn, x, w)
        return (out, *vjp(dy.astype(jnp.float32)))

    got, want = run(XLA), run("reference")
    assert [a.dtype for a in got] == [jnp.float32, jnp.bfloat16, jnp.bfloat16]
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        checks.assert_close(a, b, jnp.bfloat16)


def test_each_direction_uses_its_table_entry(tokamax_backends, monkeypatch):
    """The default ("gpu") backend reads IMPLEMENTATIONS per direction: a refused entry is
    skipped for the next one in its own direction only."""
    calls = []
    real = gpu.tokamax_call

    def spy(direction, implementation, *args, **kwargs):
        calls.append((direction, implementation))
        return real(direction, implementation, *args, **kwargs)

    monkeypatch.setattr(gpu, "tokamax_call", spy)
    monkeypatch.setattr(gpu, "IMPLEMENTATIONS",
                        {"fwd": ("xla",), "dlhs": ("bogus", "xla"), "drhs": ("xla",)})
    checks.check_matches_reference("gpu", 50, 72, 40, [10, 0, 1, 30], jnp.float32)
    # (the forward may be traced more than once: its primal and its fwd rule)
    assert list(dict.fromkeys(calls)) == [
        ("fwd", "xla"), ("dlhs", "bogus"), ("dlhs", "xla"), ("drhs", "xla")]


def test_refused_implementation_falls_back_to_lax_and_logs_once(tokamax_backends, caplog):
    with caplog.at_level(logging.WARNING, logger="kernels.gmm.gpu"):
        gpu._logged.clear()
        checks.check_matches_reference(BOGUS, 50, 72, 40, [10, 0, 1, 30], jnp.float32)
        checks.check_matches_reference(BOGUS, 40, 72, 40, [10, 0, 1, 30], jnp.float32)
    refusals = [r.getMessage() for r in caplog.records if "'bogus' failed" in r.getMessage()]
    assert len(refusals) == 3  # one per direction, not per call
    assert {m.split(":")[0] for m in refusals} == {
        "kernels.gmm fwd", "kernels.gmm dlhs", "kernels.gmm drhs"}


def test_mosaic_and_triton_refusals_on_cpu_fall_back(tokamax_backends):
    """The default table's kernels ("mosaic", "triton") do not run on CPU: the chain still
    ends in correct values (lax.ragged_dot)."""
    checks.check_matches_reference("gpu", 50, 72, 40, [10, 0, 1, 30], jnp.float32)


def test_without_tokamax_uses_lax_ragged_dot(monkeypatch):
    monkeypatch.setattr(gpu, "tokamax", None)
    jax.clear_caches()
    checks.check_matches_reference("gpu", 50, 72, 40, [10, 0, 1, 30], jnp.float32)
    assert gpu.available_implementations() == ()
    with pytest.raises(ImportError):
        gpu.tokamax_call("fwd", "xla", *checks.make_inputs(8, 4, 4, [8], jnp.float32)[:3],
                         jnp.float32)
    jax.clear_caches()


def test_lax_failure_falls_back_to_reference(monkeypatch):
    def refuse(*args, **kwargs):
        raise NotImplementedError("no ragged dot here")

    monkeypatch.setattr(gpu, "tokamax", None)
    monkeypatch.setattr(gpu, "lax_call", refuse)
    jax.clear_caches()
    checks.check_matches_reference("gpu", 50, 72, 40, [10, 0, 1, 30], jnp.float32)
    jax.clear_caches()


@pytest.mark.parametrize("m,k,n,group_sizes,dtype", CASES[:2])
def test_ragged_dot_backend_matches_reference(m, k, n, group_sizes, dtype):
    checks.check_matches_reference("ragged_dot", m, k, n, group_sizes, dtype)


def test_direct_kernels_options(tokamax_backends):
    """transpose_rhs reads rhs as [G, N, K]; tgmm checks num_groups."""
    x, w, gs, dy = checks.make_inputs(50, 72, 40, [10, 0, 1, 30], jnp.float32)
    checks.assert_close(
        gpu.gmm(dy, w, gs, transpose_rhs=True, implementation="xla"),
        reference.gmm(dy, w, gs, transpose_rhs=True), jnp.float32)
    checks.assert_close(gpu.tgmm(x, dy, gs, 4, implementation="xla"),
                        reference.tgmm(x, dy, gs), jnp.float32)
    with pytest.raises(ValueError, match="num_groups"):
        gpu.tgmm(x, dy, gs, 3, implementation="xla")


def test_default_table_and_auto_backend(monkeypatch):
    """tokamax's H100 figures: mosaic forward and input gradient, triton weight gradient;
    GPU's auto backend is this one, CPU keeps the reference."""
    assert gpu.IMPLEMENTATIONS["fwd"][0] == "mosaic"
    assert gpu.IMPLEMENTATIONS["dlhs"][0] == "mosaic"
    assert gpu.IMPLEMENTATIONS["drhs"][0] == "triton"
    gmm_pkg = sys.modules["kernels.gmm"]
    assert gmm_pkg._auto_backend() == "reference"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert gmm_pkg._auto_backend() == "gpu"


def test_available_implementations_on_cpu():
    pytest.importorskip("tokamax")
    assert gpu.available_implementations() == ("xla",)
