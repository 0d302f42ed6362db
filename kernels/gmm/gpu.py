"""NVIDIA GPU grouped matmul: tokamax's ragged-dot kernels, the implementation chosen per direction.

Wrap, don't rewrite: tokamax (``tokamax.ragged_dot_general``) holds Hopper kernels for all
three products a grouped matmul and its gradient need. ``kernels.gmm``'s custom VJP calls
this module once per direction, so each direction gets its own implementation from
``IMPLEMENTATIONS`` (tokamax's own VJP, with ``implementation=None``, runs both gradients on
the forward's backend, which puts the weight gradient on the slow kernel):

* ``fwd``:  out[M, N]     = lhs[M, K] @ rhs[g][K, N]     (ragged rows, grouped rhs)
* ``dlhs``: d lhs[M, K]   = dy[M, N] @ rhs[g][K, N]ᵀ     (the same, contracting rhs's N)
* ``drhs``: d rhs[G, K, N] = lhs_gᵀ @ dy_g              (ragged contraction over the rows)

Each entry of ``IMPLEMENTATIONS`` is a preference list of tokamax implementations
("mosaic" = Pallas Mosaic GPU, "triton" = tokamax's Triton kernel, which needs the
``jax-triton`` package, "xla" = ``lax.ragged_dot_general``). An implementation that tokamax
lacks, or that raises on a shape (at trace or lowering time), is skipped with one log line;
after the list come ``jax.lax.ragged_dot_general`` and then ``kernels.gmm.reference``. Without
tokamax installed the chain starts at ``lax.ragged_dot_general``. Note that XLA:GPU lowers
``lax.ragged_dot`` densely (G x the FLOPs) unless cuDNN's ragged-dot fusion applies, so that
fallback is correct but can be slow or run out of memory at MoE sizes.

Rows past ``sum(group_sizes)`` are zeroed here for ``fwd`` and ``dlhs`` (tokamax's GPU
kernels need not write them); ``drhs`` of an empty group is zero in every implementation
(the ragged contraction has no rows for it).

Importing this module needs neither a GPU nor tokamax; on CPU, ``implementation="xla"``
runs the whole dispatch (how tests/test_gmm_gpu.py checks the wiring against the reference).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from kernels.gmm import reference

try:
    import tokamax
except ImportError:  # tokamax is optional: the chain starts at lax.ragged_dot_general
    tokamax = None

Array = jax.Array
log = logging.getLogger(__name__)

# Per-direction choice, best first. From tokamax 0.0.17's own H100 autotune cache (random
# group sizes, MoE shapes): forward "mosaic" 415-480 TF/s, input gradient "mosaic" 360-430,
# weight gradient "triton" 620-730 ("mosaic" only 100-120, kept as its second choice for
# machines without jax-triton). `python -m experiments bench --what=gmm` on a GPU prints the
# measured table for this machine to refresh these with (no H200 cache ships with tokamax).
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "fwd": ("mosaic",),
    "dlhs": ("mosaic",),
    "drhs": ("triton", "mosaic"),
}
DIRECTIONS = tuple(IMPLEMENTATIONS)

# lax.RaggedDotDimensionNumbers per direction (tokamax's base.*_DIM_NUMS, spelled out here so
# that the lax fallback needs no tokamax).
DIMENSION_NUMBERS = {
    # lhs [M, K] . rhs [G, K, N] -> [M, N]
    "fwd": lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [1]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]),
    # dy [M, N] . rhs [G, K, N] (contract N) -> [M, K]
    "dlhs": lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]),
    # lhs [M, K] . dy [M, N] (contract the ragged M) -> [G, K, N]
    "drhs": lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[]),
}

_logged: set[tuple] = set()
_probed: dict[tuple, Exception | None] = {}  # lowering probe results, by call signature


def _log_once(key: tuple, message: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.warning(message, *args)


def available_implementations() -> tuple[str, ...]:
    """tokamax implementations usable on this platform ("xla" everywhere; "mosaic" and
    "triton" on an NVIDIA GPU when tokamax has them); () without tokamax."""
    if tokamax is None:
        return ()
    from tokamax._src.ops.ragged_dot import api  # the registry tokamax dispatches through

    names = ["xla"]
    if "NVIDIA" in jax.devices()[0].device_kind:
        names += [n for n, key in (("mosaic", "mosaic_gpu"), ("triton", "triton"))
                  if key in api.IMPLEMENTATIONS]
    return tuple(names)


def tokamax_call(direction: str, implementation: str, a: Array, b: Array, group_sizes: Array,
                 out_dtype: DTypeLike) -> Array:
    """One direction on one tokamax implementation, no fallback; raises what tokamax raises."""
    if tokamax is None:
        raise ImportError("tokamax is not installed")
    return tokamax.ragged_dot_general(
        a, b, group_sizes.astype(jnp.int32), DIMENSION_NUMBERS[direction],
        preferred_element_type=out_dtype, implementation=implementation)


def lax_call(direction: str, a: Array, b: Array, group_sizes: Array,
             out_dtype: DTypeLike) -> Array:
    """One direction on ``jax.lax.ragged_dot_general`` (float32 accumulation)."""
    out = lax.ragged_dot_general(
        a, b, group_sizes.astype(jnp.int32), DIMENSION_NUMBERS[direction],
        preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def reference_call(direction: str, a: Array, b: Array, group_sizes: Array,
                   out_dtype: DTypeLike) -> Array:
    """One direction on ``kernels.gmm.reference``."""
    if direction == "drhs":
        return reference.tgmm(a, b, group_sizes, preferred_element_type=out_dtype)
    return reference.gmm(a, b, group_sizes, preferred_element_type=out_dtype,
                         transpose_rhs=direction == "dlhs")


def _abstract(x: Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _lowers(direction: str, implementation: str, a: Array, b: Array, group_sizes: Array,
            out_dtype: jnp.dtype) -> None:
    """Lowers the call on its own, so that kernels failing at lowering time (a Pallas
    kernel refusing a shape) are caught here rather than when the caller compiles.
    "xla" cannot fail this way and is not probed."""
    if implementation == "xla":
        return
    key = (direction, implementation, *((x.shape, str(x.dtype)) for x in (a, b, group_sizes)),
           str(out_dtype))
    if key in _probed:
        if _probed[key] is not None:
            raise _probed[key]
        return
    fn = partial(tokamax_call, direction, implementation, out_dtype=out_dtype)
    try:
        jax.jit(fn).lower(_abstract(a), _abstract(b), _abstract(group_sizes))
    except Exception as error:  # noqa: BLE001 - any refusal means: try the next one
        _probed[key] = error
        raise
    _probed[key] = None


def _call(direction: str, a: Array, b: Array, group_sizes: Array, out_dtype: jnp.dtype,
          implementation: str | Sequence[str] | None) -> Array:
    """The first of (tokamax implementations..., lax.ragged_dot_general, reference) that
    takes this shape."""
    if a.dtype != b.dtype:  # e.g. a float32 dy against bfloat16 weights: compute in the wider
        a, b = (x.astype(jnp.promote_types(a.dtype, b.dtype)) for x in (a, b))
    chain = IMPLEMENTATIONS[direction] if implementation is None else implementation
    chain = (chain,) if isinstance(chain, str) else tuple(chain)
    if tokamax is None:
        _log_once(("no-tokamax",), "kernels.gmm: tokamax is not importable; GPU gmm uses "
                  "jax.lax.ragged_dot_general")
    else:
        for name in chain:
            try:
                _lowers(direction, name, a, b, group_sizes, out_dtype)
                return tokamax_call(direction, name, a, b, group_sizes, out_dtype)
            except Exception as error:  # noqa: BLE001
                _log_once((direction, name, type(error).__name__),
                          "kernels.gmm %s: tokamax implementation %r failed (%s: %s); trying "
                          "the next one", direction, name, type(error).__name__,
                          str(error)[:300])
    try:
        return lax_call(direction, a, b, group_sizes, out_dtype)
    except Exception as error:  # noqa: BLE001
        _log_once((direction, "lax", type(error).__name__),
                  "kernels.gmm %s: lax.ragged_dot_general failed (%s: %s); using the "
                  "reference", direction, type(error).__name__, str(error)[:300])
    return reference_call(direction, a, b, group_sizes, out_dtype)


def _zero_tail(out: Array, group_sizes: Array) -> Array:
    """Rows past sum(group_sizes) -> 0 (a select XLA fuses into the output's consumer)."""
    in_group = jnp.arange(out.shape[0], dtype=jnp.int32) < jnp.sum(group_sizes)  # [M]
    return jnp.where(in_group[:, None], out, jnp.zeros((), out.dtype))


def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    transpose_rhs: bool = False,
    implementation: str | Sequence[str] | None = None,
) -> Array:
    """``reference.gmm`` through tokamax: lhs [M, K], rhs [G, K, N] -> [M, N] ("fwd"), or with
    ``transpose_rhs`` rhs read as [G, N, K] -> [M, K] ("dlhs", contracting rhs's last dim);
    zero rows past ``sum(group_sizes)``. ``implementation``: a tokamax implementation (or
    preference list) overriding ``IMPLEMENTATIONS`` for this direction."""
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    direction = "dlhs" if transpose_rhs else "fwd"
    out = _call(direction, lhs, rhs, group_sizes, out_dtype, implementation)
    return _zero_tail(out, group_sizes)


def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    num_groups: int | None = None,
    *,
    preferred_element_type: DTypeLike | None = None,
    implementation: str | Sequence[str] | None = None,
) -> Array:
    """``reference.tgmm`` through tokamax ("drhs"): lhs [M, K], dy [M, N] -> [G, K, N],
    out[g] = lhs_gᵀ @ dy_g (zero for empty groups)."""
    reference.check_num_groups(num_groups, group_sizes)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    return _call("drhs", lhs, dy, group_sizes, out_dtype, implementation)


def ragged_dot_gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, transpose_rhs=False):
    """``reference.gmm`` on ``jax.lax.ragged_dot_general`` (the "ragged_dot" backend)."""
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    direction = "dlhs" if transpose_rhs else "fwd"
    return _zero_tail(lax_call(direction, lhs, rhs, group_sizes, out_dtype), group_sizes)


def ragged_dot_tgmm(lhs, dy, group_sizes, num_groups=None, *, preferred_element_type=None):
    """``reference.tgmm`` on ``jax.lax.ragged_dot_general`` (the "ragged_dot" backend)."""
    reference.check_num_groups(num_groups, group_sizes)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    return lax_call("drhs", lhs, dy, group_sizes, out_dtype)
