"""ModelConfig: validation names the bad field, presets, HF config.json in both layouts."""

import jax
import pytest
from flax import nnx

from glm_jax import ConfigError, GlmMoeModel, ModelConfig
from glm_jax.config import PRESETS

HUB_GLM45_CONFIG = {  # the Hub's zai-org/GLM-4.5 config.json (top-level rope keys)
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "partial_rotary_factor": 0.5,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1536, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "num_hidden_layers": 92, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000, "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.54.0",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 151552,
}


@pytest.mark.parametrize("changes, field", [
    (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(head_dim=10, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(num_nextn_predict_layers=2), "num_nextn_predict_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(dtype="int8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(unroll_layers="yes"), "unroll_layers"),
    (dict(ep_capacity_factor=0.0), "ep_capacity_factor"),
    (dict(ep_capacity_factor="2"), "ep_capacity_factor"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{field}:"):
        ModelConfig.preset("tiny", **changes)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("glm5")


def test_presets_follow_spec():
    glm45 = ModelConfig.preset("glm45")
    assert (glm45.hidden_size, glm45.num_hidden_layers, glm45.first_k_dense_replace) == (5120, 92, 3)
    assert (glm45.n_routed_experts, glm45.num_experts_per_tok, glm45.use_qk_norm) == (160, 8, True)
    air = ModelConfig.preset("glm45_air")
    assert (air.hidden_size, air.n_routed_experts, air.use_qk_norm, air.routed_scaling_factor) == (
        4096, 128, False, 1.0)
    mini = ModelConfig.preset("glm45_mini")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads) == (2048, 16, 40)
    for name in PRESETS:
        assert ModelConfig.preset(name).rotary_dim == ModelConfig.preset(name).head_dim // 2


def test_from_hub_config():
    config = ModelConfig.from_hf(HUB_GLM45_CONFIG)
    assert config == ModelConfig.preset("glm45")


def test_from_transformers5_config():
    hf = {k: v for k, v in HUB_GLM45_CONFIG.items() if k not in ("rope_theta", "partial_rotary_factor")}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 1.0}
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 5e5 and config.partial_rotary_factor == 1.0
    assert config.rotary_dim == 128


def test_from_hf_rejects_other_models_and_rope_types():
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({**HUB_GLM45_CONFIG, "model_type": "llama"})
    with pytest.raises(ConfigError, match="rope_type 'yarn'"):
        ModelConfig.from_hf({**HUB_GLM45_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4}})


def test_to_hf_round_trip():
    for name in PRESETS:
        config = ModelConfig.preset(name)
        assert ModelConfig.from_hf(config.to_hf()) == config


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", PRESETS)
def test_param_counts_match_closed_form(name):
    """The abstract model's parameter count equals the closed form, total and active."""
    config = ModelConfig.preset(name)
    model = nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))
    counts = config.param_counts()
    assert _count(nnx.state(model, nnx.Param)) == counts["total"]
    assert _count(nnx.state(model.mtp, nnx.Param)) == counts["mtp"]
    experts = nnx.state(model.moe_layers.mlp.experts, nnx.Param)
    per_expert = _count(experts) // (config.num_moe_layers * config.n_routed_experts)
    unused = config.num_moe_layers * (config.n_routed_experts - config.num_experts_per_tok)
    assert counts["total"] - counts["mtp"] - unused * per_expert == counts["active"]


def test_glm45_size():
    counts = ModelConfig.preset("glm45").param_counts()
    assert 350e9 <= counts["total"] <= 360e9
    assert 30e9 <= counts["active"] <= 35e9  # "355B-A32B"
    air = ModelConfig.preset("glm45_air").param_counts()
    assert 105e9 <= air["total"] <= 112e9 and 11e9 <= air["active"] <= 14e9  # "106B-A12B"
