"""FP8 (e4m3) block-wise weight quantisation for RL rollouts (SPEC §3: "RL rollouts in FP8 with
online block-wise weight quantization at each update").

Format: DeepSeek-V3 / GLM-4.5-FP8. Each 128 x 128 block of a matrix's last two axes gets one
float32 scale `amax(|block|) / 448` (448 = largest finite e4m3 value), and the block is stored as
`float8_e4m3fn(w / scale)`, rounded to nearest. A checkpoint's `weight_scale_inv` is our `scale`:
the factor that turns the stored values back into weights. Leading axes (stacked layers [L],
experts [E]) are batched over, so every layer and every expert has its own blocks.

Which weights go to FP8 (`is_fp8_weight`), as GLM-4.5-FP8 and the vLLM / SGLang loaders do:
- FP8: every matrix inside a decoder layer's attention (q/k/v/o) or MLP block (dense MLP, routed
  experts, shared experts), in the main layers and in the MTP layer;
- kept: the router (`mlp.gate.kernel`, run in float32 as the SPEC requires: expert choice is
  discrete and would amplify rounding), word embeddings, `lm_head`, the MTP's `eh_proj` and
  `shared_head` (vLLM builds eh_proj as a plain unquantised Linear), and every norm scale and bias.

Why "fake quant" (`quantize_params`): the rollout model receives each weight as
`dequantize(quantize_blockwise(w))` in its usual param dtype and runs the unchanged model code.
A fused FP8 GEMM multiplies the e4m3 values and applies the per-block scales to the float32
partial sums; since a block's scale is constant over the block, that is the same sum over the same
products, so the only difference is accumulation order (plus, for bfloat16 params, the rounding
of the dequantised weight to bfloat16, relative 2^-9, well below the e4m3 step of 2^-4). Fake
quant therefore runs anywhere (CPU tests included) and is the reference that a future fused
FP8 kernel (GPU / TPU, saving the ~2x weight bytes of `fp8_weight_bytes` per decode step) must
match to within accumulation-order error.

"Online at each update": quantisation is a pure jnp function of the new weights, run after every
optimizer step before the weights go to the rollout engine (`quantize_model` jits it; jit
`quantize_params` yourself where the state is already split).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from glm_jax.naming import MATRIX_NAMES, path_names

E4M3_MAX = 448.0  # largest finite float8_e4m3fn; casts beyond ±464 give NaN, not saturation
DEFAULT_BLOCK = (128, 128)

_FP8_BLOCKS = ("self_attn", "mlp")  # decoder-layer sub-blocks whose matrices run in FP8
_ROUTER = "gate"  # MoE.gate is the Router (a shared expert's `gate_proj` is a different name)


@struct.dataclass
class Fp8Tensor:
    """A block-quantised matrix (or stack of matrices). A pytree: `values` and `scales` are
    leaves, `block` is static, so it can live in jitted state."""

    values: jax.Array  # [..., A, B] float8_e4m3fn
    scales: jax.Array  # [..., ceil(A / block[0]), ceil(B / block[1])] float32, amax / 448
    block: tuple[int, int] = struct.field(pytree_node=False, default=DEFAULT_BLOCK)


def quantize_blockwise(w: jax.Array, block: tuple[int, int] = DEFAULT_BLOCK) -> Fp8Tensor:
    """w [..., A, B] -> Fp8Tensor. Dimensions that are not multiples of the block are zero-padded
    (zeros never raise a block's amax) and cropped again. An all-zero block gets scale 0 and
    values 0 (no 0/0 = NaN); exact zeros stay zero."""
    *lead, a, b = w.shape
    ba, bb = block
    na, nb = -(-a // ba), -(-b // bb)
    pad = [(0, 0)] * len(lead) + [(0, na * ba - a), (0, nb * bb - b)]
    blocks = jnp.pad(w.astype(jnp.float32), pad).reshape(*lead, na, ba, nb, bb)
    # Both divisions are written as multiplications by reciprocals because that is what XLA
    # turns them into under jit (a division by a constant or by a broadcast) but not op by op:
    # spelled out, eager and jitted results agree bit for bit. An all-zero block divides by a
    # stand-in 1 instead of 0.
    scales = jnp.max(jnp.abs(blocks), axis=(-3, -1)) * jnp.float32(1 / E4M3_MAX)  # [..., na, nb]
    inverse = 1.0 / jnp.where(scales > 0, scales, 1.0)
    # |w| / scale <= 448 up to float32 rounding; clip, since float8_e4m3fn casts do not
    # saturate (values past 464 become NaN).
    q = jnp.clip(blocks * inverse[..., :, None, :, None], -E4M3_MAX, E4M3_MAX)
    q = q.astype(jnp.float8_e4m3fn)
    values = q.reshape(*lead, na * ba, nb * bb)[..., :a, :b]
    return Fp8Tensor(values=values, scales=scales, block=tuple(block))


def dequantize(t: Fp8Tensor, dtype=jnp.bfloat16) -> jax.Array:
    """Fp8Tensor -> [..., A, B] in `dtype`: values * their block's scale, in float32."""
    a, b = t.values.shape[-2:]
    scales = jnp.repeat(jnp.repeat(t.scales, t.block[0], axis=-2), t.block[1], axis=-1)
    return (t.values.astype(jnp.float32) * scales[..., :a, :b]).astype(dtype)


def is_fp8_weight(names: tuple[str, ...]) -> bool:
    """Whether the parameter at this state path (e.g. `("moe_layers", "mlp", "experts",
    "gate_proj")`) runs in FP8 during rollouts; see the module docstring for the rule."""
    return (names[-1] in MATRIX_NAMES
            and any(n in _FP8_BLOCKS for n in names)
            and not (len(names) > 1 and names[-2] == _ROUTER))


def quantize_params(params, *, block: tuple[int, int] = DEFAULT_BLOCK):
    """The same tree (an `nnx.State` of Variables, or of plain arrays) with every FP8 weight
    replaced by its FP8 round trip `dequantize(quantize_blockwise(w))` in w's own dtype; every
    other leaf is returned as is."""

    def fake_quant(path, leaf):
        if not is_fp8_weight(path_names(path)):
            return leaf
        if isinstance(leaf, nnx.Variable):
            w = leaf[...]
            return leaf.replace(dequantize(quantize_blockwise(w, block), w.dtype))
        return dequantize(quantize_blockwise(leaf, block), leaf.dtype)

    return jax.tree_util.tree_map_with_path(
        fake_quant, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


_quantize_params_jit = jax.jit(quantize_params, static_argnames="block")


def quantize_model(model: nnx.Module, *, block: tuple[int, int] = DEFAULT_BLOCK) -> nnx.Module:
    """A new model whose FP8 weights are fake-quantised (`quantize_params`, jitted: one program,
    compiled once and reused at every update); `model` is unchanged."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _quantize_params_jit(state, block=block))


class WeightBytes(NamedTuple):
    bf16: int  # every weight stored in bfloat16
    fp8: int  # FP8 weights as e4m3 values + float32 block scales, the rest in bfloat16

    @property
    def ratio(self) -> float:
        return self.bf16 / self.fp8


def fp8_weight_bytes(params, *, block: tuple[int, int] = DEFAULT_BLOCK) -> WeightBytes:
    """Weight memory of the Param tree in bfloat16 vs FP8. Reads only shapes, so it also takes
    the abstract state of `nnx.eval_shape` (e.g. the full GLM-4.5 without allocating it)."""
    bf16 = fp8 = 0
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, leaf in flat:
        if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param):
            continue  # buffers (the router's balancing bias) are not weights
        size = math.prod(leaf.shape)
        bf16 += 2 * size
        if is_fp8_weight(path_names(path)):
            *lead, a, b = leaf.shape
            fp8 += size + 4 * math.prod(lead) * -(-a // block[0]) * -(-b // block[1])
        else:
            fp8 += 2 * size
    return WeightBytes(bf16=bf16, fp8=fp8)
