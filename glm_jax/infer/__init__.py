"""Inference: KV-cache generation and sampling, MTP speculative decoding, FP8 weights, the
GLM-4.5 chat format."""

from glm_jax.infer.chat import parse_output, render_chat, render_tool_calls
from glm_jax.infer.fp8 import (Fp8Tensor, WeightBytes, dequantize, fp8_weight_bytes,
                               is_fp8_weight, quantize_blockwise, quantize_model, quantize_params)
from glm_jax.infer.engine import Generation, SamplingConfig, generate, sample, stream
from glm_jax.infer.session import ChatSession
from glm_jax.infer.speculative import SpeculativeResult, speculative_greedy

__all__ = ["ChatSession", "Fp8Tensor", "Generation", "SamplingConfig", "SpeculativeResult", "WeightBytes",
           "dequantize", "fp8_weight_bytes", "generate", "is_fp8_weight", "parse_output",
           "quantize_blockwise", "quantize_model", "quantize_params", "render_chat",
           "render_tool_calls", "sample", "speculative_greedy", "stream"]
