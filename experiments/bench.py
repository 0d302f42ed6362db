"""Benchmarks, printed as JSON lines; peers are measured in the same run.

decode: glm_jax generation (KV cache, jitted while-loop decode, greedy) at batch 1 / 16 / 64,
plus prefill tokens/s; and, when torch and transformers are importable, transformers'
`generate` on the same weights and settings (its fastest MoE path, `grouped_mm`), with ratios.
The memory-bandwidth bound (bytes of weights touched per decode step / HBM bandwidth) is printed
where the device's bandwidth is known.
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, save_hf
from glm_jax.infer import SamplingConfig, generate

GREEDY = SamplingConfig(temperature=0.0)


def _time(fn, repeats: int = 3) -> float:
    fn()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _transformers_decode(model, prompts, new_tokens, dtype_name):
    """tokens/s of transformers' generate on the same weights, or None without torch."""
    try:
        import torch
        from transformers import Glm4MoeForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/m")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = Glm4MoeForCausalLM.from_pretrained(
            f"{tmp}/m", dtype=getattr(torch, dtype_name),
            experts_implementation="grouped_mm").to(device).eval()
    ids = torch.tensor(prompts, device=device)

    def run():
        with torch.no_grad():
            reference.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()

    return len(prompts) * new_tokens / _time(run, repeats=2)


def decode(preset: str, *, prompt_len: int = 128, new_tokens: int = 128,
           batches=(1, 16, 64)) -> None:
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    config = ModelConfig.preset(preset, param_dtype=dtype, dtype=dtype)
    model = nnx.jit(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))()
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
    for batch in batches:
        prompts = rng.integers(0, config.vocab_size, (batch, prompt_len)).tolist()
        seconds = _time(lambda: generate(model, prompts, max_new_tokens=new_tokens,
                                         sampling=GREEDY))
        prefill = _time(lambda: generate(model, prompts, max_new_tokens=1, sampling=GREEDY))
        ours = batch * new_tokens / max(seconds - prefill, 1e-9)
        record = {"bench": "decode", "preset": preset, "device": device, "dtype": dtype,
                  "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "glm_jax_tokens_per_s": round(ours, 1),
                  "glm_jax_prefill_tokens_per_s": round(batch * prompt_len / prefill, 1),
                  "jax": jax.__version__}
        peer = _transformers_decode(model, prompts, new_tokens, dtype)
        if peer is not None:
            record.update(transformers_tokens_per_s=round(peer, 1), ratio=round(ours / peer, 2))
        _emit(record)


BENCHMARKS = {"decode": decode}
