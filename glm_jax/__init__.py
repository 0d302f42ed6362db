"""glm-jax: the GLM-4.5 Mixture-of-Experts LLM in JAX / Flax NNX."""

from glm_jax.config import ModelConfig
from glm_jax.convert import load_hf, save_hf
from glm_jax.errors import CheckpointError, ConfigError, InputError
from glm_jax.infer import parse_output, render_chat
from glm_jax.model import GlmMoeModel, ModelOutput, MoeStats, RouterBias

__all__ = ["CheckpointError", "ConfigError", "GlmMoeModel", "InputError", "ModelConfig", "ModelOutput",
           "MoeStats", "RouterBias", "load_hf", "parse_output", "render_chat", "save_hf"]
