"""NVIDIA GPU grouped matmul: Pallas kernels on the Triton backend.

Same contract as ``kernels.gmm.reference``; the schedule is megablox's.

* ``gmm``: a grid over (visit, N tile). A visit is one (group, row tile)
  pair that overlap -- at most ``ceil(M / tm) + G - 1`` of them, listed in jnp
  by ``reference.schedule`` and passed to the kernel as small int32 arrays
  it indexes with its program id. Each program accumulates its [tm, tn] tile
  over K in float32 and stores only the rows of its group (a masked store), so
  a row tile shared by two groups is written by two programs, row-disjointly.
  Rows past ``sum(group_sizes)`` are never stored: the output buffer is a
  zeros array aliased in (``input_output_aliases``).
* ``tgmm``: a grid over (group, K tile, N tile); each program loops over its
  group's row tiles (dynamic bounds from the group offsets), masking rows of
  neighbouring groups, and writes its [tk, tn] block of ``out[group]`` --
  zeros for an empty group, whose loop runs no iterations.

Ragged M, K and N need no padding copies: every load is masked (``other=0``)
and every store masked to the real rows and columns, so tiles may overhang
the arrays. Triton needs power-of-two blocks of at least 16 for ``dot``,
which the tile heuristic (``_tiles``) guarantees.

float32 operands use Triton's default dot precision (TF32 on Ampere and
newer, as XLA's default for float32 matmuls); the interpreter is exact.

Importing this module needs no GPU; ``interpret=True`` runs the kernels
through the Pallas interpreter (how the CPU tests exercise them).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.typing import DTypeLike

from kernels.gmm import reference

Array = jax.Array

_MIN_TILE = 16  # Triton's dot needs every block dim >= 16 (and a power of two)


def _pow2_tile(dim: int, max_tile: int) -> int:
    """Smallest power of two >= ``dim``, clamped to [16, ``max_tile``]."""
    return max(_MIN_TILE, min(max_tile, 1 << max(dim - 1, 0).bit_length()))


def _tiles(
    kind: str, m: int, k: int, n: int, num_groups: int, dtype: jnp.dtype
) -> tuple[int, int, int]:
    """(tm, tk, tn) for ``kind`` "gmm" or "tgmm": a heuristic, not yet tuned.

    gmm: tn = 128 and tk = 64 (32 for 4-byte dtypes, keeping one pipeline
    stage of operands at 32 KiB of shared memory) are the usual Triton matmul
    tiles. tm follows the mean group size M / G: every visit computes a full
    tm-row tile, so groups much smaller than tm waste up to (G - 1) * tm rows
    of work; 128 rows once groups are that large.
    tgmm: the f32 accumulator is [tk, tn] = up to [128, 128] and tm is the
    contraction chunk: 64 (32 for 4-byte dtypes).
    Every tile shrinks to the (power-of-two-rounded) dim when that is smaller.
    """
    wide = jnp.dtype(dtype).itemsize >= 4
    if kind == "gmm":
        mean_group = -(-m // num_groups)
        return (_pow2_tile(mean_group, 128), _pow2_tile(k, 32 if wide else 64), _pow2_tile(n, 128))
    return (_pow2_tile(m, 32 if wide else 64), _pow2_tile(k, 128), _pow2_tile(n, 128))


def _compiler_params(rows: int, cols: int) -> plgpu.CompilerParams:
    """8 warps for the largest (128 x 128) output tiles, else 4; 3 stages."""
    return plgpu.CompilerParams(num_warps=8 if rows * cols >= 128 * 128 else 4, num_stages=3)


def _gmm_kernel(
    group_ref, tile_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, _zeros_ref, out_ref,
    *, tm: int, tk: int, tn: int, k: int, n: int, transpose_rhs: bool,
):  # fmt: skip
    """One (visit, N tile): out[rows of the group in this tile, tn cols]."""
    visit, col_tile = pl.program_id(0), pl.program_id(1)
    group, lo, hi = group_ref[visit], lo_ref[visit], hi_ref[visit]
    row0, col0 = tile_ref[visit] * tm, col_tile * tn
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)  # [tm]
    cols = col0 + jnp.arange(tn, dtype=jnp.int32)  # [tn]
    in_rows = (rows >= lo) & (rows < hi)  # [tm]; hi <= M, so also in bounds
    in_cols = cols < n  # [tn]

    def body(i, acc):
        k0 = i * tk
        in_k = k0 + jnp.arange(tk, dtype=jnp.int32) < k  # [tk]
        x = plgpu.load(
            lhs_ref.at[pl.ds(row0, tm), pl.ds(k0, tk)],
            mask=in_rows[:, None] & in_k[None, :], other=0,
        )  # [tm, tk]
        if transpose_rhs:  # rhs [G, N, K]
            w = plgpu.load(
                rhs_ref.at[group, pl.ds(col0, tn), pl.ds(k0, tk)],
                mask=in_cols[:, None] & in_k[None, :], other=0,
            )  # [tn, tk]
        else:  # rhs [G, K, N]
            w = plgpu.load(
                rhs_ref.at[group, pl.ds(k0, tk), pl.ds(col0, tn)],
                mask=in_k[:, None] & in_cols[None, :], other=0,
            )  # [tk, tn]
        return acc + plgpu.dot(x, w, trans_b=transpose_rhs)  # [tm, tn] f32

    # Padding visits (lo == hi) skip the K loop: they store nothing anyway.
    num_k = jnp.where(lo < hi, pl.cdiv(k, tk), 0)
    acc = lax.fori_loop(0, num_k, body, jnp.zeros((tm, tn), jnp.float32))
    plgpu.store(
        out_ref.at[pl.ds(row0, tm), pl.ds(col0, tn)],
        acc.astype(out_ref.dtype),
        mask=in_rows[:, None] & in_cols[None, :],
    )


@partial(
    jax.jit, static_argnames=("preferred_element_type", "transpose_rhs", "tiling", "interpret")
)
def gmm(
    lhs: Array,
    rhs: Array,
    group_sizes: Array,
    *,
    preferred_element_type: DTypeLike | None = None,
    transpose_rhs: bool = False,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool = False,
) -> Array:
    """``reference.gmm`` as a Triton kernel: lhs [M, K], rhs [G, K, N] (or
    [G, N, K] with ``transpose_rhs``) -> [M, N]; zero rows past
    ``sum(group_sizes)``. ``tiling``: (tm, tk, tn) powers of two >= 16, or
    None for ``_tiles``."""
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tm, tk, tn = tiling or _tiles("gmm", m, k, n, num_groups, lhs.dtype)
    s = reference.schedule(group_sizes, m, tm)  # P = ceil(M / tm) + G - 1 visits
    lo = s.starts[s.group]  # [P] first row of the visit's group
    hi = jnp.where(s.valid, s.ends[s.group], lo)  # [P] padding visits get no rows
    kernel = partial(
        _gmm_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n, transpose_rhs=transpose_rhs
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(s.group.shape[0], pl.cdiv(n, tn)),
        input_output_aliases={6: 0},  # the zeros buffer becomes the output
        compiler_params=_compiler_params(tm, tn),
        interpret=interpret,
        name="gmm",
    )(s.group, s.tile, lo, hi, lhs, rhs, jnp.zeros((m, n), out_dtype))


def _tgmm_kernel(
    starts_ref, ends_ref, lhs_ref, dy_ref, out_ref, *, tm: int, tk: int, tn: int, k: int, n: int
):
    """One (group, K tile, N tile): out[g, tk, tn] = lhs_gᵀ @ dy_g, over the group's rows."""
    group = pl.program_id(0)
    k0, col0 = pl.program_id(1) * tk, pl.program_id(2) * tn
    lo, hi = starts_ref[group], ends_ref[group]
    in_k = k0 + jnp.arange(tk, dtype=jnp.int32) < k  # [tk]
    in_cols = col0 + jnp.arange(tn, dtype=jnp.int32) < n  # [tn]

    def body(t, acc):
        rows = t * tm + jnp.arange(tm, dtype=jnp.int32)  # [tm]
        in_rows = (rows >= lo) & (rows < hi)
        # Both operands masked: 0 * (inf/NaN in another group's dy) would poison the sum.
        x = plgpu.load(
            lhs_ref.at[pl.ds(t * tm, tm), pl.ds(k0, tk)],
            mask=in_rows[:, None] & in_k[None, :], other=0,
        )  # [tm, tk]
        d = plgpu.load(
            dy_ref.at[pl.ds(t * tm, tm), pl.ds(col0, tn)],
            mask=in_rows[:, None] & in_cols[None, :], other=0,
        )  # [tm, tn]
        return acc + plgpu.dot(x, d, trans_a=True)  # [tk, tn] f32

    # Row tiles touching [lo, hi); none for an empty group, which stores zeros.
    first = lo // tm
    last = jnp.where(hi > lo, pl.cdiv(hi, tm), first)
    acc = lax.fori_loop(first, last, body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(
        out_ref.at[group, pl.ds(k0, tk), pl.ds(col0, tn)],
        acc.astype(out_ref.dtype),
        mask=in_k[:, None] & in_cols[None, :],
    )


@partial(
    jax.jit, static_argnames=("num_groups", "preferred_element_type", "tiling", "interpret")
)
def tgmm(
    lhs: Array,
    dy: Array,
    group_sizes: Array,
    num_groups: int | None = None,
    *,
    preferred_element_type: DTypeLike | None = None,
    tiling: tuple[int, int, int] | None = None,
    interpret: bool = False,
) -> Array:
    """``reference.tgmm`` as a Triton kernel: lhs [M, K], dy [M, N] ->
    [G, K, N], out[g] = lhs_gᵀ @ dy_g (zero for empty groups)."""
    reference.check_num_groups(num_groups, group_sizes)
    m, k = lhs.shape
    n = dy.shape[1]
    num_groups = group_sizes.shape[0]
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    tm, tk, tn = tiling or _tiles("tgmm", m, k, n, num_groups, lhs.dtype)
    starts, ends = reference.group_bounds(group_sizes, m)  # [G] each
    kernel = partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, k=k, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups, pl.cdiv(k, tk), pl.cdiv(n, tn)),
        compiler_params=_compiler_params(tk, tn),
        interpret=interpret,
        name="tgmm",
    )(starts, ends, lhs, dy)
