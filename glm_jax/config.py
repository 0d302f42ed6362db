"""Model configuration: the GLM-4.5 hyper-parameters (HF `config.json` names) plus our dtype policy.

A frozen dataclass validated on construction, so a bad value fails at once with the field's name
rather than as a shape error deep inside a jitted forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from glm_jax.errors import ConfigError

_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "cudnn", "splash")
# How we run the model, not what it is: never written to nor read from an HF config.json.
_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "attention_impl", "attention_block_size",
                   "unroll_layers", "ep_capacity_factor")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 1408  # width of each routed / shared expert
    num_hidden_layers: int = 46
    first_k_dense_replace: int = 1
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 1_000_000.0
    use_qk_norm: bool = False
    attention_bias: bool = True  # q/k/v only; o_proj never has a bias
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 131072
    num_nextn_predict_layers: int = 1  # MTP layers (0 or 1)
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # Not part of the HF config: how we run it.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls; the router is always float32
    remat: str = "none"  # rematerialisation of each scanned layer: one of _REMAT_POLICIES
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; see glm_jax.model.attention
    attention_block_size: int = 256  # query / key block of the blockwise attention
    # The decoder layers as straight-line code instead of a lax.scan: no per-layer copies of the
    # stacked weights and saved activations, and fusion across layers. 1.2x forward + backward
    # for a 4-layer model on CPU (RESULTS.md); compile time grows with depth, so off by default.
    unroll_layers: bool = False
    # Expert parallelism: each device's dispatch buffer holds ep_capacity_factor x its balanced
    # share of token copies; copies past it take further passes, never dropped (model/moe.py).
    # Smaller buffers, less memory (TPU: 1.25 saves 6.9 GiB/chip on GLM-4.5, BUILD.md); more
    # imbalance absorbed in one pass with larger ones.
    ep_capacity_factor: float = 2.0

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                    "max_position_embeddings", "attention_block_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, f"must be a positive integer, got {value!r}")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(name, f"must be a non-negative integer, got {value!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            _fail("first_k_dense_replace", f"{self.first_k_dense_replace} exceeds num_hidden_layers "
                  f"{self.num_hidden_layers}")
        if self.num_nextn_predict_layers > 1:
            _fail("num_nextn_predict_layers", "only 0 or 1 MTP layer is supported (GLM-4.5 has 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_key_value_heads", f"num_attention_heads {self.num_attention_heads} is not "
                  f"divisible by num_key_value_heads {self.num_key_value_heads}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            _fail("partial_rotary_factor", f"must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            _fail("partial_rotary_factor", f"rotary dim int(head_dim * partial_rotary_factor) = "
                  f"{self.rotary_dim} must be even and positive")
        if self.rope_theta <= 0:
            _fail("rope_theta", f"must be positive, got {self.rope_theta}")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", f"n_routed_experts {self.n_routed_experts} is not divisible by "
                  f"n_group {self.n_group}")
        if self.topk_group > self.n_group:
            _fail("topk_group", f"topk_group {self.topk_group} > n_group {self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > kept:
            _fail("num_experts_per_tok", f"top-k {self.num_experts_per_tok} exceeds the {kept} "
                  f"experts in the kept groups (topk_group * n_routed_experts / n_group)")
        if self.routed_scaling_factor <= 0:
            _fail("routed_scaling_factor", f"must be positive, got {self.routed_scaling_factor}")
        if self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        if self.hidden_act != "silu":
            _fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.tie_word_embeddings:
            _fail("tie_word_embeddings", "GLM-4.5 unties the lm_head; tied embeddings are unsupported")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                _fail(name, f"must be float32, bfloat16 or float16, got {value!r}")
        if self.remat not in _REMAT_POLICIES:
            _fail("remat", f"must be one of {_REMAT_POLICIES}, got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail("attention_impl",
                  f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if (not isinstance(self.ep_capacity_factor, (int, float))
                or isinstance(self.ep_capacity_factor, bool) or self.ep_capacity_factor <= 0):
            _fail("ep_capacity_factor", f"must be a number > 0, got {self.ep_capacity_factor!r}")
        if not isinstance(self.unroll_layers, bool):
            _fail("unroll_layers", f"must be True or False, got {self.unroll_layers!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> ModelConfig:
        """Reads the Hub's GLM-4.5 config.json (top-level rope keys) or the transformers-5 form
        (`rope_parameters: {rope_theta, partial_rotary_factor, rope_type}`)."""
        if hf.get("model_type", "glm4_moe") != "glm4_moe":
            raise ConfigError(f"model_type is {hf['model_type']!r}, expected 'glm4_moe'")
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is unsupported (only 'default')")
        kwargs: dict[str, Any] = {}
        hf_fields = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        for name in hf_fields:
            if name in hf and hf[name] is not None:
                kwargs[name] = hf[name]
        for name in ("rope_theta", "partial_rotary_factor"):
            if name in rope:
                kwargs[name] = rope[name]
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        if "partial_rotary_factor" not in kwargs:
            kwargs["partial_rotary_factor"] = 0.5  # transformers' Glm4MoeConfig default
        if "rope_theta" not in kwargs:
            kwargs["rope_theta"] = 10000.0  # transformers' default when the config names none
        for name in ("rope_theta", "partial_rotary_factor", "routed_scaling_factor", "rms_norm_eps",
                     "initializer_range"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
        return cls(**{**kwargs, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers' Glm4MoeConfig reads (Hub layout, top-level rope keys)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _RUNTIME_FIELDS}
        out.update(
            architectures=["Glm4MoeForCausalLM"],
            model_type="glm4_moe",
            attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            dtype=self.param_dtype,
            use_cache=True,
        )
        return out

    # ---- sizes -----------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Closed-form parameter counts: `total` (with MTP), `active` per token (main model, top-k
        experts plus shared), `mtp`. The balance bias is a buffer, not a parameter."""
        h, v = self.hidden_size, self.vocab_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.use_qk_norm:
            attn += 2 * self.head_dim
        norms = 2 * h
        dense = 3 * h * self.intermediate_size
        expert = 3 * h * self.moe_intermediate_size
        router = self.n_routed_experts * h
        shared = self.n_shared_experts * expert
        moe_total = router + self.n_routed_experts * expert + shared
        moe_active = router + self.num_experts_per_tok * expert + shared
        k, m = self.first_k_dense_replace, self.num_moe_layers
        embed_head = 2 * v * h
        total = embed_head + h + k * (attn + norms + dense) + m * (attn + norms + moe_total)
        active = embed_head + h + k * (attn + norms + dense) + m * (attn + norms + moe_active)
        mtp = 0
        if self.num_nextn_predict_layers:
            mtp = embed_head + 2 * h * h + 3 * h + attn + norms + moe_total
        return {"total": total + mtp, "active": active, "mtp": mtp}


def _fail(field: str, message: str):
    raise ConfigError(f"ModelConfig.{field}: {message}")


_PRESETS: dict[str, dict[str, Any]] = {
    "glm45": dict(
        hidden_size=5120, num_hidden_layers=92, first_k_dense_replace=3, intermediate_size=12288,
        moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, use_qk_norm=True,
        routed_scaling_factor=2.5),
    "glm45_air": dict(
        hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, intermediate_size=10944,
        moe_intermediate_size=1408, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, use_qk_norm=False,
        routed_scaling_factor=1.0),
    "glm45_mini": dict(
        hidden_size=2048, num_hidden_layers=16, first_k_dense_replace=1, intermediate_size=5632,
        moe_intermediate_size=768, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8,
        num_attention_heads=40, num_key_value_heads=4, head_dim=128, use_qk_norm=True,
        routed_scaling_factor=2.5, max_position_embeddings=4096),
    # A few layers that run forward+backward on CPU in well under a second; every feature on.
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1,
        intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, use_qk_norm=True, routed_scaling_factor=2.5, max_position_embeddings=1024),
}

PRESETS = tuple(_PRESETS)
