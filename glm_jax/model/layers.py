"""Small building blocks: parameters with logical axes, Linear, Embed, RMSNorm, SwiGLU, RoPE.

Written by hand rather than with `nnx.Linear` so every parameter carries its logical axis names
(`logical_axes` metadata, mapped to mesh axes by `glm_jax.sharding`) and follows one dtype policy:
parameters are stored in `config.param_dtype` and cast to the compute dtype at use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.config import ModelConfig
from glm_jax.sharding import constrain


def normal_param(rngs: nnx.Rngs, shape, axes, config: ModelConfig) -> nnx.Param:
    """A N(0, initializer_range) weight, as transformers initialises GLM-4.5."""
    value = config.initializer_range * jax.random.normal(rngs.params(), shape, config.jnp_param_dtype)
    return nnx.Param(value, logical_axes=axes)


def constant_param(shape, axes, value: float, config: ModelConfig) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, config.jnp_param_dtype), logical_axes=axes)


def unsharded_embed(axes):
    """A weight's logical axes at its use: the FSDP axis (`embed`) gathered, the rest as stored."""
    return tuple(None if a == "embed" else a for a in axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias). kernel is [in, out] (the transpose of torch's nn.Linear weight)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, axes: tuple[str, str],
                 config: ModelConfig, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (in_features, out_features), axes, config)
        self.bias = constant_param((out_features,), axes[1:], 0.0, config) if bias else None
        self.dtype = config.jnp_dtype
        self.axes = axes

    def cast_kernel(self):
        """The kernel in the compute dtype, still as stored (FSDP-sharded). Cast before the
        gather, so the all-gather moves the compute dtype (the constraint keeps sharding
        propagation from gathering the float32 weight instead)."""
        return constrain(self.kernel[...], *self.axes).astype(self.dtype)

    def gather(self, kernel):
        """`cast_kernel()`, or a slice of its output axis, with the FSDP shards gathered."""
        return constrain(kernel, *unsharded_embed(self.axes))

    def __call__(self, x):
        y = x.astype(self.dtype) @ self.gather(self.cast_kernel())
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, features: int, *, config: ModelConfig, rngs: nnx.Rngs):
        self.embedding = normal_param(rngs, (vocab_size, features), ("vocab", "embed"), config)
        self.dtype = config.jnp_dtype

    def __call__(self, ids):  # [B, S] -> [B, S, H]
        # Look up in the table as it is stored (under FSDP each device holds an `embed` slice of
        # every row): gather every device's ids (small), take this slice of their rows, then
        # reshard the rows to the batch layout (an all-to-all of activations). Neither the table
        # nor its gradient is ever whole on one device.
        table = self.embedding[...].astype(self.dtype)
        rows = jnp.take(table, constrain(ids, None, None), axis=0)
        return constrain(constrain(rows, None, None, "embed"), "batch", "seq", None)


class RMSNorm(nnx.Module):
    """transformers' Glm4MoeRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, features: int, *, eps: float, config: ModelConfig, axis_name: str = "embed"):
        self.scale = constant_param((features,), (axis_name,), 1.0, config)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU without biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, config: ModelConfig,
                 rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False, axes=("embed", "mlp"),
                                config=config, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False, axes=("embed", "mlp"),
                              config=config, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, axes=("mlp", "embed"),
                                config=config, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_cos_sin(positions, config: ModelConfig, dtype):
    """cos/sin tables [B, S, rotary_dim] for NeoX-style (non-interleaved) partial RoPE."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """Rotates the first rotary_dim channels of each head of x [B, S, N, D]; the rest pass through."""
    dim = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = x_rot[..., : dim // 2], x_rot[..., dim // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
