"""Model FLOPs of training, for MFU (model FLOPs utilisation).

Per trained token: 6 x the active matmul parameters (2 FLOPs per multiply-add forward, 4
backward), plus causal attention's two products (QK^T and PV: 2 x 2 x heads x head_dim FLOPs
per key, over S/2 keys on average, times 3 for forward and backward). The embedding lookup is
a gather and counts nothing; the LM head and the router are matmuls and count. The MTP layer is
not model FLOPs (its work is overhead), so the MFU of a step that trains it is conservative.
This is PaLM's convention (appendix B) with the causal half of the attention.
"""

from __future__ import annotations

from glm_jax.config import ModelConfig

# Dense bf16 peaks (FLOP/s) by `device_kind` prefix, for MFU where the device is known.
PEAK_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
                   "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
                   "TPU v4": 275e12}


def matmul_params_per_token(config: ModelConfig) -> int:
    """The weights one token multiplies through: attention projections, the dense MLPs, the
    router, the top-k and shared experts of each MoE layer, the LM head (no norms, biases or
    the embedding table, which are not matmuls)."""
    h = config.hidden_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = 2 * h * q + 2 * h * kv
    expert = 3 * h * config.moe_intermediate_size
    moe = (config.n_routed_experts * h
           + (config.num_experts_per_tok + config.n_shared_experts) * expert)
    dense = 3 * h * config.intermediate_size
    layers = (config.num_hidden_layers * attention + config.first_k_dense_replace * dense
              + config.num_moe_layers * moe)
    return layers + config.vocab_size * h


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward) in rows of `seq_len` tokens."""
    heads = config.num_attention_heads * config.head_dim
    attention = 6 * config.num_hidden_layers * seq_len * heads
    return 6.0 * matmul_params_per_token(config) + attention


def peak_flops(device_kind: str) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if device_kind.startswith(k)), None)
