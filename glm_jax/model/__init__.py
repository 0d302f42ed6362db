"""The GLM-4.5 MoE model in Flax NNX."""

from glm_jax.model.moe import MoeStats, RouterBias
from glm_jax.model.transformer import GlmMoeModel, ModelOutput

__all__ = ["GlmMoeModel", "ModelOutput", "MoeStats", "RouterBias"]
