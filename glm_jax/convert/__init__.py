"""Checkpoint conversion: Hugging Face safetensors <-> glm_jax."""

from glm_jax.convert.hf import CheckpointError, load_hf, save_hf

__all__ = ["CheckpointError", "load_hf", "save_hf"]
