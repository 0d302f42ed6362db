"""TPU grouped matmul: thin wrapper over the megablox Pallas kernels in jax.

Wrap, don't rewrite: ``jax.experimental.pallas.ops.tpu.megablox.gmm`` already
holds tuned TPU kernels for ``gmm`` and ``tgmm``. This module only maps the
``kernels.gmm.reference`` contract onto theirs:

* megablox needs M divisible by the row tile (it raises otherwise), so ``lhs``
  (and ``dy``) get zero rows appended up to a tile multiple.
* K and N are zero-padded up to tile multiples as well, so the kernels never
  see a ragged contracting or output tile. A ragged K tile gave wrong results
  in MaxText's copy of megablox (MaxText issue 1183); the copy in jax masks it
  (and passes that repro), but correctness here does not rest on the masking.
  Padding costs a copy only for shapes no tile divides; MoE dims (multiples
  of 512) never pay it.
* megablox's ``gmm`` leaves output rows that belong to no group
  uninitialised (they come back as garbage / NaN), so rows past
  ``sum(group_sizes)`` are zeroed here.
* ``tgmm`` takes ``lhs`` as [K, M]; group_sizes must be int32.

``interpret`` runs the same kernels through the Pallas interpreter, which is
how the CPU tests exercise this file (see ``tests/test_gmm_tpu.py``).
"""

import jax
import jax.numpy as jnp
# Import from the submodule: the package re-exports ``ops.gmm`` (a custom-VJP
# wrapper) under the same name ``gmm``, shadowing the module attribute.
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as _mb_gmm
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as _mb_tgmm
from jax.typing import DTypeLike

from kernels.gmm import reference

Array = jax.Array

# Largest (tm, tk, tn) tiles. 512 keeps the f32 accumulator (tk x tn in tgmm)
# at 1 MiB, well inside every TPU generation's default scoped VMEM.
TILING = (512, 512, 512)
_LANE = 128  # a block's minor dims must be multiples of this unless full-size


def _tile(dim: int, max_tile: int) -> int:
    """Tile for one dimension: the whole dim if it fits, else the largest
    power-of-two fraction of ``max_tile`` (>= 128) that divides ``dim``, else
    ``max_tile`` (and the dim gets padded). Full-size and 128-multiple blocks
    are always legal Mosaic block shapes."""
    if dim <= max_tile:
        return dim
    tile = max_tile
    while tile >= _LANE:
        if dim % tile == 0:
            return tile
        tile //= 2
    return max_tile


def _round_up(x: int, tile: int) -> int:
    return -(-x // tile) * tile


def _pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pad ``x`` at the end of each axis up to ``shape`` (no-op if equal)."""
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, s - d) for d, s in zip(x.shape, shape, strict=True)])


def _tiles(
    m: int, k: int, n: int, tiling: tuple[int, int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(tm, tk, tn) and the padded (M, K, N) they divide."""
    tiles = tuple(_tile(d, t) for d, t in zip((m, k, n), tiling, strict=True))
    padded = tuple(_round_up(d, t) for d, t in zip((m, k, n), tiles, strict=True))
    return tiles, padded


def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] = TILING,
    interpret: bool = False,
) -> Array:
    """``reference.gmm`` on the megablox kernel: lhs [M, K], rhs [G, K, N]
    (or [G, N, K] with ``transpose_rhs``) -> [M, N]; zero rows past
    ``sum(group_sizes)``. ``tiling`` gives the largest (tm, tk, tn)."""
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tiles, (mp, kp, np_) = _tiles(m, k, n, tiling)
    num_groups = rhs.shape[0]
    rhs_p = _pad_to(rhs, (num_groups, np_, kp) if transpose_rhs else (num_groups, kp, np_))
    group_sizes = group_sizes.astype(jnp.int32)
    out = _mb_gmm(
        _pad_to(lhs, (mp, kp)),
        rhs_p,
        group_sizes,
        preferred_element_type=out_dtype,
        tiling=tiles,
        transpose_rhs=transpose_rhs,
        interpret=interpret,
    )[:m, :n]  # [M, N]
    in_group = jnp.arange(m, dtype=jnp.int32) < jnp.sum(group_sizes)  # [M]
    return jnp.where(in_group[:, None], out, jnp.zeros((), out_dtype))


def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    num_groups: int | None = None,
    *,
    preferred_element_type: DTypeLike | None = None,
    tiling: tuple[int, int, int] = TILING,
    interpret: bool = False,
) -> Array:
    """``reference.tgmm`` on the megablox kernel: lhs [M, K], dy [M, N] ->
    [G, K, N], out[g] = lhs_gᵀ @ dy_g (zero for empty groups)."""
    reference.check_num_groups(num_groups, group_sizes)
    m, k = lhs.shape
    n = dy.shape[1]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tiles, (mp, kp, np_) = _tiles(m, k, n, tiling)
    out = _mb_tgmm(
        _pad_to(lhs, (mp, kp)).T,  # megablox wants [K, M]; it transposes back inside
        _pad_to(dy, (mp, np_)),
        group_sizes.astype(jnp.int32),
        preferred_element_type=out_dtype,
        tiling=tiles,
        interpret=interpret,
    )  # [G, Kp, Np]
    return out[:, :k, :n]
