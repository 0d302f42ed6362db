"""Plain-jnp grouped matmul (gmm) and its transposed form (tgmm).

Rows of ``lhs`` are grouped contiguously by ``group_sizes``: rows
``[0, gs[0])`` form group 0, the next ``gs[1]`` rows group 1, and so on; rows
past ``sum(group_sizes)`` belong to no group. Group sizes must be >= 0.

Both functions walk, in one ``lax.scan``, every (row tile, group) pair that
overlaps -- at most ``ceil(M / tm) + G - 1`` of them (the megablox schedule),
``visits_per_step`` of them per step as one batched matmul. Work is
O(M·K·N + G·tm·K·N) and temporaries are one step's tiles plus the output.
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
# Visits per scan step, run as one batched matmul: on a 2-core CPU a lone 128-row matmul
# reaches ~60 GF/s and a batch of them ~100+ (experiments/benchmarks/RESULTS.md).
VISITS_PER_STEP = 4
_PRECISION = lax.Precision.HIGHEST  # a reference: no TF32 / bf16-pass shortcuts


class _Schedule(NamedTuple):
    """Static-length list of (tile, group) visits, ordered by group then tile."""

    group: Array  # [P] int32, group of each visit
    tile: Array  # [P] int32, row tile of each visit
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
    return _Schedule(group, tile, i < total, starts, ends)


def _row_mask(s: _Schedule, group: Array, tile: Array, valid: Array, tm: int) -> Array:
    """[V, tm] bool: which rows of each visited tile belong to the visit's group."""
    rows = tile[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)  # [V, tm]
    return valid[:, None] & (rows >= s.starts[group][:, None]) & (rows < s.ends[group][:, None])


def _tiles(x: Array, tm: int) -> Array:
    """x [M, C] zero-padded to whole row tiles -> [ceil(M / tm), tm, C]."""
    return jnp.pad(x, ((0, -x.shape[0] % tm), (0, 0))).reshape(-1, tm, x.shape[1])


def _steps(s: _Schedule, visits_per_step: int) -> tuple[Array, Array, Array]:
    """The schedule's (group, tile, valid) in [steps, visits_per_step] chunks (padding visits
    invalid), so each scan step runs several tiles as one batched matmul."""
    v = min(visits_per_step, s.group.shape[0])
    pad = -s.group.shape[0] % v
    group, tile = (jnp.pad(a, (0, pad), mode="edge").reshape(-1, v) for a in (s.group, s.tile))
    return group, tile, jnp.pad(s.valid, (0, pad)).reshape(-1, v)


@partial(jax.jit, static_argnames=("preferred_element_type", "transpose_rhs", "tile_m",
                                   "visits_per_step"))
def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    transpose_rhs: bool = False,
    tile_m: int = TILE_M,
    visits_per_step: int = VISITS_PER_STEP,
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
    tiles = _tiles(lhs, tm)  # [Mp / tm, tm, K]

    def step(out: Array, visits: tuple[Array, Array, Array]) -> tuple[Array, None]:
        group, tile, valid = visits  # [V] each
        spec = "vmk,vnk->vmn" if transpose_rhs else "vmk,vkn->vmn"
        y = jnp.einsum(spec, tiles[tile], rhs[group], precision=_PRECISION,
                       preferred_element_type=jnp.float32)  # [V, tm, N]
        y = jnp.where(_row_mask(s, group, tile, valid, tm)[..., None], y, 0).astype(out_dtype)
        # Each row belongs to exactly one visit (its group's); the others add zeros.
        return out.at[tile].add(y), None

    out = jnp.zeros((tiles.shape[0], tm, n), out_dtype)
    out, _ = lax.scan(step, out, _steps(s, visits_per_step))
    return out.reshape(-1, n)[:m]


@partial(jax.jit, static_argnames=("num_groups", "preferred_element_type", "tile_m",
                                   "visits_per_step"))
def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    num_groups: int | None = None,
    *,
    preferred_element_type: DTypeLike | None = None,
    tile_m: int = TILE_M,
    visits_per_step: int = VISITS_PER_STEP,
) -> Array:
    """out[g] = lhs_gᵀ @ dy_g over the rows of group g (zero for empty groups).

    lhs [M, K], dy [M, N], group_sizes [G] -> [G, K, N] in
    ``preferred_element_type`` (default lhs.dtype). This is d(rhs) of ``gmm``.
    ``num_groups`` (static) defaults to, and must equal, ``len(group_sizes)``.
    Visits come group by group, so one float32 [K, N] sums the current group and only the
    output is [G, K, N] (a float32 [G, K, N] accumulator is 2x a bfloat16 output, ~0.6 GiB
    per GLM-4.5 expert stack shard). Each visit writes its group's running sum; the last
    write is the whole sum, rounded once.
    """
    check_num_groups(num_groups, group_sizes)
    m, k = lhs.shape
    n = dy.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tm = _tile_rows(m, tile_m)
    s = schedule(group_sizes, m, tm)
    lhs_tiles, dy_tiles = _tiles(lhs, tm), _tiles(dy, tm)  # [Mp / tm, tm, K], [.., N]

    def step(carry: tuple[Array, Array, Array], visits: tuple[Array, Array, Array]):
        out, running, running_group = carry  # [G, K, N], [K, N] float32, [] int32
        group, tile, valid = visits  # [V] each
        mask = _row_mask(s, group, tile, valid, tm)[..., None]  # [V, tm, 1]
        parts = jnp.einsum("vmk,vmn->vkn", lhs_tiles[tile], jnp.where(mask, dy_tiles[tile], 0),
                           precision=_PRECISION, preferred_element_type=jnp.float32)  # [V, K, N]
        for v in range(group.shape[0]):
            running = jnp.where(group[v] == running_group, running, 0) + parts[v]
            out = lax.dynamic_update_index_in_dim(out, running.astype(out_dtype), group[v], 0)
            running_group = group[v]
        return (out, running, running_group), None

    carry = (jnp.zeros((num_groups, k, n), out_dtype), jnp.zeros((k, n), jnp.float32),
             jnp.array(-1, jnp.int32))
    (out, _, _), _ = lax.scan(step, carry, _steps(s, visits_per_step))
    return out
