"""Inference-side helpers: the GLM-4.5 chat format."""

from glm_jax.infer.chat import parse_output, render_chat, render_tool_calls

__all__ = ["parse_output", "render_chat", "render_tool_calls"]
