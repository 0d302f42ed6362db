"""The MFU numerator: `train_flops_per_token` equals the matmul FLOPs jax actually traces for a
training gradient (counted from the jaxpr, scans multiplied out), once the part of the attention
the causal mask discards is added back (our attention computes the full S x S scores)."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig
from glm_jax.train.flops import matmul_params_per_token, peak_flops, train_flops_per_token


def _dot_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[c] for c in contract)
        repeat = eqn.params.get("length", 1)  # scan
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += repeat * _dot_flops(inner)
    return total


def test_flops_per_token_match_the_traced_matmuls():
    # dense layers only: the reference MoE path multiplies more than the top-k experts
    config = ModelConfig.preset("tiny").replace(
        num_hidden_layers=2, first_k_dense_replace=2, num_nextn_predict_layers=0)
    model = GlmMoeModel(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch, seq = 2, 32

    def loss(params, ids):
        logits = nnx.merge(graphdef, params, rest)(ids)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    ids = jnp.zeros((batch, seq), jnp.int32)
    traced = _dot_flops(jax.make_jaxpr(jax.grad(loss))(params, ids).jaxpr)
    tokens = batch * seq
    masked_half = 6 * config.num_hidden_layers * seq * config.num_attention_heads * config.head_dim
    expected = (train_flops_per_token(config, seq) + masked_half) * tokens
    assert traced == pytest.approx(expected, rel=1e-6)


def test_moe_layers_count_the_router_and_the_top_k_and_shared_experts_only():
    config = ModelConfig.preset("tiny").replace(num_hidden_layers=2, first_k_dense_replace=1)
    h, f, e = config.hidden_size, config.moe_intermediate_size, config.n_routed_experts
    dense_layer = 3 * h * config.intermediate_size
    moe_layer = e * h + (config.num_experts_per_tok + config.n_shared_experts) * 3 * h * f
    dense_only = config.replace(first_k_dense_replace=2)
    assert (matmul_params_per_token(config) - matmul_params_per_token(dense_only)
            == moe_layer - dense_layer)
    assert config.n_routed_experts > config.num_experts_per_tok  # so the test could fail


def test_peak_flops_by_device_kind():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("cpu") is None
