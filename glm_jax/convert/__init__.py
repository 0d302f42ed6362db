"""Checkpoint conversion: Hugging Face safetensors <-> glm_jax."""

from glm_jax.convert.hf import load_hf, save_hf
from glm_jax.errors import CheckpointError

__all__ = ["CheckpointError", "load_hf", "save_hf"]
