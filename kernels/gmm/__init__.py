"""Grouped matmul for MoE experts, differentiable, with pluggable backends.

``gmm(lhs, rhs, group_sizes)`` multiplies each contiguous row group of ``lhs``
by its own ``rhs[g]``. The custom VJP spells out the backward pass in terms of
the backend's own ``gmm`` (for d lhs) and ``tgmm`` (for d rhs), so a fast
backend only has to provide those two forward kernels. The "gpu" backend
(tokamax) picks its kernel per direction -- forward, d lhs, d rhs -- from
``gpu.IMPLEMENTATIONS``.
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kernels.backends import platform, resolve
from kernels.gmm import gpu, reference, tpu

Array = jax.Array


class GmmBackend(NamedTuple):
    """The two kernels a backend provides; signatures as in ``reference``."""

    gmm: Callable[..., Array]  # (lhs, rhs, group_sizes, *, preferred_element_type, transpose_rhs)
    tgmm: Callable[..., Array]  # (lhs, dy, group_sizes, num_groups, *, preferred_element_type)


BACKENDS: dict[str, GmmBackend] = {
    "reference": GmmBackend(reference.gmm, reference.tgmm),
    "tpu": GmmBackend(tpu.gmm, tpu.tgmm),  # megablox Pallas kernels
    "gpu": GmmBackend(gpu.gmm, gpu.tgmm),  # tokamax, per direction; lax / reference fallbacks
    "ragged_dot": GmmBackend(gpu.ragged_dot_gmm, gpu.ragged_dot_tgmm),  # jax.lax.ragged_dot
}


def _auto_backend() -> str:
    """The one place that picks a backend per platform (`kernels.backends.platform()`).

    TPU uses jax's megablox kernels, GPU tokamax's (``gpu``, which falls back
    to ``lax.ragged_dot`` and then the reference by itself); CPU the reference
    (``lax.ragged_dot`` expands to a [G, M, K] masked copy there).
    """
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}.get(platform(), "reference")


def _check_inputs(lhs: Array, rhs: Array, group_sizes: Array) -> None:
    if lhs.ndim != 2:
        raise ValueError(f"gmm: lhs must be 2-D [M, K], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must be 3-D [G, K, N], got shape {rhs.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"gmm: K mismatch, lhs {lhs.shape} has K={lhs.shape[1]} "
            f"but rhs {rhs.shape} has K={rhs.shape[1]}"
        )
    if lhs.shape[0] == 0:
        raise ValueError("gmm: lhs must have at least one row")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(
            f"gmm: group_sizes must have shape [G]=({rhs.shape[0]},), got {group_sizes.shape}"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"gmm: group_sizes must be integer, got {group_sizes.dtype}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"gmm: {name} must be floating point, got {x.dtype}")


@partial(jax.jit, static_argnames=("backend", "preferred_element_type"))
def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    backend: str = "auto",
    preferred_element_type: DTypeLike | None = None,
) -> Array:
    """Grouped matmul: lhs [M, K], rhs [G, K, N], group_sizes [G] int -> [M, N].

    Rows ``[sum(gs[:g]), sum(gs[:g+1]))`` of ``lhs`` are multiplied by
    ``rhs[g]``. Rows past ``sum(group_sizes)`` give zeros and get zero
    gradient; ``group_sizes`` (>= 0, sum <= M) gets no gradient. Accumulates
    in float32; output dtype is ``preferred_element_type`` or ``lhs.dtype``.
    ``backend``: "auto" or a key of ``BACKENDS``.
    """
    _check_inputs(lhs, rhs, group_sizes)
    name = resolve("gmm", backend, BACKENDS, _auto_backend)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    return _gmm(lhs, rhs, group_sizes, name, out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs: Array, rhs: Array, group_sizes: Array, backend: str, out_dtype: jnp.dtype) -> Array:
    return BACKENDS[backend].gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype)


def _gmm_fwd(
    lhs: Array, rhs: Array, group_sizes: Array, backend: str, out_dtype: jnp.dtype
) -> tuple[Array, tuple[Array, Array, Array]]:
    return _gmm(lhs, rhs, group_sizes, backend, out_dtype), (lhs, rhs, group_sizes)


def _gmm_bwd(
    backend: str, out_dtype: jnp.dtype, res: tuple[Array, Array, Array], dy: Array
) -> tuple[Array, Array, None]:
    del out_dtype
    lhs, rhs, group_sizes = res
    impl = BACKENDS[backend]
    # d lhs = dy @ rhs[g]ᵀ per group: the same gmm, reading rhs as [G, N, K].
    dlhs = impl.gmm(
        dy, rhs, group_sizes, preferred_element_type=lhs.dtype, transpose_rhs=True
    )  # [M, K]
    # d rhs[g] = lhs_gᵀ @ dy_g.
    drhs = impl.tgmm(
        lhs, dy, group_sizes, rhs.shape[0], preferred_element_type=rhs.dtype
    )  # [G, K, N]
    return dlhs, drhs, None  # None: no cotangent for the integer group_sizes


_gmm.defvjp(_gmm_fwd, _gmm_bwd)

__all__ = ["BACKENDS", "GmmBackend", "gmm", "gpu", "reference", "tpu"]
