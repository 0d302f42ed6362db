"""Inference: KV-cache generation and sampling, the GLM-4.5 chat format."""

from glm_jax.infer.chat import parse_output, render_chat, render_tool_calls
from glm_jax.infer.generate import Generation, SamplingConfig, generate, sample, stream

__all__ = ["Generation", "SamplingConfig", "generate", "parse_output", "render_chat",
           "render_tool_calls", "sample", "stream"]
