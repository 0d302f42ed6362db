"""Plain-jnp grouped matmul (gmm) and its transposed form (tgmm).

Rows of ``lhs`` are grouped contiguously by ``group_sizes``: rows
``[0, gs[0])`` form group 0, the next ``gs[1]`` rows group 1, and so on; rows
past ``sum(group_sizes)`` belong to no group. Group sizes must be >= 0.

Both functions walk, in one ``lax.scan``, every (row tile, group) pair that
overlaps -- at most ``ceil(M / tm) + G - 1`` of them (the megablox schedule).
Work is O(M·K·N + G·tm·K·N) and temporaries are one row tile plus the output.
This avoids both the [M, K, N] per-row weight gather and the [G, M, K] masked
copy of ``lhs`` that ``jax.lax.ragged_dot`` expands to on CPU (and on GPU when
XLA has no native kernel), which would not fit at MoE sizes.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

Array = jax.Array

TILE_M = 128
_PRECISION = lax.Precision.HIGHEST  # a reference: no TF32 / bf16-pass shortcuts


class _Schedule(NamedTuple):
    """Static-length list of (tile, group) visits, ordered by group then tile."""

    group: Array  # [P] int32, group of each visit
    tile: Array  # [P] int32, row tile of each visit
    first: Array  # [P] bool, first visit of its group
    valid: Array  # [P] bool, False for padding visits past the real ones
    starts: Array  # [G] int32, first row of each group
    ends: Array  # [G] int32, one past the last row of each group (<= M)


def _tile_rows(m: int, tile_m: int) -> int:
    """Row-tile size: ``tile_m``, shrunk (to a multiple of 8) for small M."""
    return min(tile_m, -(-m // 8) * 8)


def group_bounds(group_sizes: Array, m: int) -> tuple[Array, Array]:
    """First row and one-past-last row of each group, [G] int32 each, clipped to M rows."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # [G]
    starts = jnp.concatenate([jnp.zeros(1, jnp.int32), ends[:-1]])  # [G]
    return starts, ends


def check_num_groups(num_groups: int | None, group_sizes: Array) -> None:
    """tgmm's static `num_groups`, when given, must agree with `group_sizes`."""
    if num_groups is not None and num_groups != group_sizes.shape[0]:
        raise ValueError(f"num_groups={num_groups} but group_sizes has shape {group_sizes.shape}")


def schedule(group_sizes: Array, m: int, tm: int) -> _Schedule:
    num_groups = group_sizes.shape[0]
    num_tiles = -(-m // tm)
    starts, ends = group_bounds(group_sizes, m)
    first_tile = starts // tm  # [G]
    counts = jnp.where(ends > starts, (ends - 1) // tm - first_tile + 1, 0)  # [G] tiles touched
    cum = jnp.cumsum(counts)  # [G]
    total = cum[-1]
    # Consecutive non-empty groups share at most one tile, so the number of
    # real visits is <= num_tiles + G - 1: a static bound for the scan.
    i = jnp.arange(num_tiles + num_groups - 1, dtype=jnp.int32)  # [P]
    # Padding visits (i >= total) repeat the last real visit with ``valid`` off.
    j = jnp.minimum(i, total - 1)
    group = jnp.minimum(jnp.searchsorted(cum, j, side="right"), num_groups - 1)
    group = group.astype(jnp.int32)
    group_first_visit = cum[group] - counts[group]
    tile = jnp.clip(first_tile[group] + j - group_first_visit, 0, num_tiles - 1)
    return _Schedule(group, tile, i == group_first_visit, i < total, starts, ends)


def _row_mask(s: _Schedule, group: Array, row0: Array, valid: Array, tm: int) -> Array:
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)  # [tm]
    return valid & (rows >= s.starts[group]) & (rows < s.ends[group])


def _pad_rows(x: Array, rows: int) -> Array:
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


@partial(jax.jit, static_argnames=("preferred_element_type", "transpose_rhs", "tile_m"))
def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    transpose_rhs: bool = False,
    tile_m: int = TILE_M,
) -> Array:
    """out[r] = lhs[r] @ rhs[group(r)]; zero for rows past sum(group_sizes).

    lhs [M, K], rhs [G, K, N] (or [G, N, K] with ``transpose_rhs``, which the
    backward pass uses to avoid materialising a transposed copy), group_sizes
    [G] -> [M, N] in ``preferred_element_type`` (default lhs.dtype), with
    float32 accumulation.
    """
    m = lhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tm = _tile_rows(m, tile_m)
    s = schedule(group_sizes, m, tm)
    lhs_p = _pad_rows(lhs, (-(-m // tm)) * tm)  # [Mp, K]

    def step(out: Array, visit: tuple[Array, Array, Array]) -> tuple[Array, None]:
        group, tile, valid = visit
        row0 = tile * tm
        x = lax.dynamic_slice_in_dim(lhs_p, row0, tm)  # [tm, K]
        w = lax.dynamic_index_in_dim(rhs, group, keepdims=False)  # [K, N] or [N, K]
        w = w.T if transpose_rhs else w
        y = jnp.dot(x, w, precision=_PRECISION, preferred_element_type=jnp.float32)  # [tm, N]
        mask = _row_mask(s, group, row0, valid, tm)  # [tm]
        cur = lax.dynamic_slice_in_dim(out, row0, tm)  # [tm, N]
        # Each row is written by exactly one visit (its group's), so select, not add.
        new = jnp.where(mask[:, None], y.astype(out_dtype), cur)
        return lax.dynamic_update_slice_in_dim(out, new, row0, axis=0), None

    out = jnp.zeros((lhs_p.shape[0], n), out_dtype)  # [Mp, N]
    out, _ = lax.scan(step, out, (s.group, s.tile, s.valid))
    return out[:m]


@partial(jax.jit, static_argnames=("num_groups", "preferred_element_type", "tile_m"))
def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    num_groups: int | None = None,
    *,
    preferred_element_type: DTypeLike | None = None,
    tile_m: int = TILE_M,
) -> Array:
    """out[g] = lhs_gᵀ @ dy_g over the rows of group g (zero for empty groups).

    lhs [M, K], dy [M, N], group_sizes [G] -> [G, K, N] in
    ``preferred_element_type`` (default lhs.dtype). This is d(rhs) of ``gmm``.
    ``num_groups`` (static) defaults to, and must equal, ``len(group_sizes)``.
    Accumulates each group in one float32 [K, N] carry: visits are ordered by
    group, so the carry restarts at a group's first visit and is rewritten
    into the output after every visit (the last write holds the full sum).
    """
    check_num_groups(num_groups, group_sizes)
    m, k = lhs.shape
    n = dy.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tm = _tile_rows(m, tile_m)
    s = schedule(group_sizes, m, tm)
    rows_p = (-(-m // tm)) * tm
    lhs_p, dy_p = _pad_rows(lhs, rows_p), _pad_rows(dy, rows_p)  # [Mp, K], [Mp, N]

    def step(
        carry: tuple[Array, Array], visit: tuple[Array, Array, Array, Array]
    ) -> tuple[tuple[Array, Array], None]:
        out, acc = carry
        group, tile, first, valid = visit
        row0 = tile * tm
        mask = _row_mask(s, group, row0, valid, tm)  # [tm]
        x = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(lhs_p, row0, tm), 0)  # [tm, K]
        d = lax.dynamic_slice_in_dim(dy_p, row0, tm)  # [tm, N]
        part = jnp.einsum(
            "mk,mn->kn", x, d, precision=_PRECISION, preferred_element_type=jnp.float32
        )  # [K, N]
        acc = jnp.where(first, part, acc + part)
        out = lax.dynamic_update_index_in_dim(out, acc.astype(out_dtype), group, axis=0)
        return (out, acc), None

    init = (jnp.zeros((num_groups, k, n), out_dtype), jnp.zeros((k, n), jnp.float32))
    (out, _), _ = lax.scan(step, init, (s.group, s.tile, s.first, s.valid))
    return out
