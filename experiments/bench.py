"""Benchmarks, printed as JSON lines; peers are measured in the same run.

kernels: grouped matmul at the GLM-4.5-Air / GLM-4.5 expert shapes (a CPU-sized shape on CPU)
against jax.lax.ragged_dot, tokamax, torch._grouped_mm and the dense ceiling; routing vs its
jnp reference.

decode: glm_jax generation (KV cache, jitted while-loop decode, greedy) at batch 1 / 16 / 64,
plus prefill tokens/s; and, when torch and transformers are importable, transformers'
`generate` on the same weights and settings (its fastest MoE path, `grouped_mm`), with ratios.
The memory-bandwidth bound (bytes of weights touched per decode step / HBM bandwidth) is printed
where the device's bandwidth is known.

rewards: completions scored per second by each verifiable reward, in process and pooled.
train: our whole training step against transformers' forward + backward (tokens/s, MFU, memory).
all: every benchmark in one call.
"""

from __future__ import annotations

import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, save_hf
from glm_jax.infer import SamplingConfig, generate

GREEDY = SamplingConfig(temperature=0.0)


def _time(fn, repeats: int = 3) -> float:
    """Best of `repeats` runs after one warm-up (compilation) run."""
    return _time_first(fn, repeats)[1]


def _time_first(fn, repeats: int = 3) -> tuple[float, float]:
    """-> (seconds of the first call, compilation included; best of `repeats` after it)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return first, best


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
        first, seconds = _time_first(lambda: generate(model, prompts, max_new_tokens=new_tokens,
                                                      sampling=GREEDY))
        # Prefill plus one decode step (its warm-up run compiles the smaller token buffer).
        prefill = _time(lambda: generate(model, prompts, max_new_tokens=1, sampling=GREEDY))
        ours = batch * new_tokens / max(seconds - prefill, 1e-9)
        record = {"bench": "decode", "preset": preset, "device": device, "dtype": dtype,
                  "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                  "first_call_s": round(first, 3), "steady_call_s": round(seconds, 4),
                  "glm_jax_tokens_per_s": round(ours, 1),
                  "glm_jax_prefill_tokens_per_s": round(batch * prompt_len / prefill, 1),
                  "jax": jax.__version__}
        peer = _transformers_decode(model, prompts, new_tokens, dtype)
        if peer is not None:
            record.update(transformers_tokens_per_s=round(peer, 1), ratio=round(ours / peer, 2))
        _emit(record)


# The grouped matmuls the MoE layer runs, per expert: gate and up (each K = hidden -> N =
# expert width) and down (expert width -> hidden). (name, rows = tokens x top-k, K, N, experts)
GMM_SHAPES = [("glm45_air_gate_up", 16384 * 8, 4096, 1408, 128),
              ("glm45_air_down", 16384 * 8, 1408, 4096, 128),
              ("glm45_gate_up", 16384 * 8, 5120, 1536, 160),
              ("glm45_down", 16384 * 8, 1536, 5120, 160)]
CPU_GMM_SHAPES = [("tiny_cpu", 2048, 256, 128, 16)]  # the same code path at a CPU-sized shape


def _group_sizes(rows: int, groups: int, rng) -> np.ndarray:
    """Imbalanced but realistic loads: Dirichlet(1) shares (a few experts 3-4x the mean)."""
    sizes = np.floor(rng.dirichlet(np.ones(groups)) * rows).astype(np.int32)
    sizes[0] += rows - sizes.sum()
    return sizes


def _jax_timer(fn, *args):
    jitted = jax.jit(fn)
    return _time(lambda: jax.block_until_ready(jitted(*args)))


def _torch_grouped_mm(lhs, rhs, sizes):
    """(fwd seconds, fwd+bwd seconds) of torch._grouped_mm on CUDA, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    a = torch.randn(lhs.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(rhs.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)

    def fwd():
        torch._grouped_mm(a, b, offs=offsets)
        torch.cuda.synchronize()

    def fwd_bwd():
        torch._grouped_mm(a, b, offs=offsets).sum().backward()
        torch.cuda.synchronize()

    return _time(fwd), _time(fwd_bwd)


def kernels_bench(preset: str = "") -> None:
    """Grouped-matmul TFLOP/s (forward and forward+backward) of kernels.gmm against
    jax.lax.ragged_dot, tokamax (if importable), torch._grouped_mm (if CUDA torch) and the dense
    matmul of the same FLOPs; then routing time against the jnp reference."""
    import jax.numpy as jnp

    import kernels
    from kernels.routing import reference as routing_reference

    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
    for name, rows, k, n, groups in (CPU_GMM_SHAPES if on_cpu else GMM_SHAPES):
        sizes = jnp.asarray(_group_sizes(rows, groups, rng))
        lhs = jnp.asarray(rng.normal(size=(rows, k)), dtype)
        rhs = jnp.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), dtype)
        flops = 2 * rows * k * n
        candidates = {
            "kernels.gmm": lambda x, w: kernels.gmm(x, w, sizes),
            "lax.ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
            "dense_matmul": lambda x, w: x @ w[0],
        }
        try:
            import tokamax
            candidates["tokamax.ragged_dot"] = lambda x, w: tokamax.ragged_dot(x, w, sizes)
        except ImportError:
            pass
        results = {}
        for label, fn in candidates.items():
            loss = lambda x, w, fn=fn: jnp.sum(fn(x, w).astype(jnp.float32))
            try:
                forward = _jax_timer(fn, lhs, rhs)
                both = _jax_timer(jax.grad(loss, argnums=(0, 1)), lhs, rhs) + forward
            except Exception as error:  # e.g. out of memory for a densely lowered ragged_dot
                _emit({"bench": "gmm", "shape": name, "impl": label, "error": str(error)[:200]})
                continue
            results[label] = (flops / forward / 1e12, 3 * flops / both / 1e12)
        torch_times = _torch_grouped_mm(lhs, rhs, np.asarray(sizes))
        if torch_times is not None:
            results["torch._grouped_mm"] = (flops / torch_times[0] / 1e12,
                                            3 * flops / torch_times[1] / 1e12)
        ours = results.get("kernels.gmm")
        for label, (fwd, fwd_bwd) in results.items():
            record = {"bench": "gmm", "shape": name, "rows": rows, "k": k, "n": n,
                      "experts": groups, "device": device, "dtype": jnp.dtype(dtype).name,
                      "impl": label, "fwd_tflops": round(fwd, 2), "fwd_bwd_tflops": round(fwd_bwd, 2)}
            if ours and label != "kernels.gmm":
                record.update(gmm_fwd_ratio=round(ours[0] / fwd, 2),
                              gmm_fwd_bwd_ratio=round(ours[1] / fwd_bwd, 2))
            _emit(record)
    for tokens, experts in ((4096 if on_cpu else 16384, 128), (4096 if on_cpu else 16384, 160)):
        logits = jnp.asarray(rng.normal(size=(tokens, experts)), jnp.float32)
        bias = jnp.zeros((experts,), jnp.float32)
        args = dict(top_k=8, n_group=1, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=2.5)
        fast = _jax_timer(lambda l, b: kernels.route(l, b, **args), logits, bias)
        ref = _jax_timer(lambda l, b: routing_reference.route(l, b, **args), logits, bias)
        _emit({"bench": "route", "tokens": tokens, "experts": experts, "device": device,
               "auto_ms": round(fast * 1e3, 3), "reference_ms": round(ref * 1e3, 3),
               "speedup": round(ref / fast, 2)})


def _reward_batch(name: str, count: int):
    """`count` (completion, reference) pairs for a reward, half right and half wrong."""
    calc = "<tool_call>calculator\n<arg_key>expression</arg_key>\n<arg_value>{} * 7</arg_value>\n</tool_call>"
    pairs = []
    for i in range(count):
        wrong = i % 2
        if name == "math":
            pairs.append((f"<think>so {i} + {i}</think>\\boxed{{{2 * i + wrong}}}", str(2 * i)))
        elif name == "exact_match":
            pairs.append((f"{i}, {i + 1 + wrong}", f"{i}, {i + 1}"))
        elif name == "function_call":
            pairs.append((calc.format(i + wrong), [{"name": "calculator",
                                                    "arguments": {"expression": f"{i} * 7"}}]))
        else:
            pairs.append((f"```python\ndef f(x):\n    return x * {2 + wrong}\n```",
                          [f"assert f({i + 1}) == {2 * i + 2}", "assert f(1) == 2"]))
    return pairs


def rewards_bench(preset: str = "", count: int = 256) -> None:
    """Completions scored per second by each reward: in this process (workers=0) and through
    RewardPool's worker processes (2 workers), its start-up excluded (a warm-up batch first)."""
    from glm_jax.rl.rewards import RewardPool

    for name in ("math", "exact_match", "function_call", "code"):
        n = count if name != "code" else count // 8  # a subprocess per completion
        completions, references = zip(*_reward_batch(name, n))
        row = {"bench": "rewards", "reward": name, "completions": n}
        for workers in (0, 2):
            with RewardPool(workers=workers) as pool:
                pool.score(name, completions[:4], references[:4])  # start-up, first-call costs
                start = time.perf_counter()
                scores = pool.score(name, completions, references)
                row[f"workers{workers}_per_s"] = round(n / (time.perf_counter() - start), 1)
                assert scores == [float(i % 2 == 0) for i in range(n)], (name, scores[:8])
        _emit(row)


# The CPU side-by-side of the fast-paths issue: a small GLM that CI and the tiny demos resemble.
CPU_TRAIN_CONFIG = dict(hidden_size=256, num_hidden_layers=4, n_routed_experts=16,
                        num_experts_per_tok=4, intermediate_size=512, moe_intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def _train_batch(config, batch: int, seq: int) -> dict:
    """One micro-batch of random tokens in the step's [micro, B, S] layout."""
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq + 1))
    positions = np.broadcast_to(np.arange(seq), (1, batch, seq))
    return {"input_ids": jnp.asarray(ids[..., :-1], jnp.int32),
            "target_ids": jnp.asarray(ids[..., 1:], jnp.int32),
            "segment_ids": jnp.ones((1, batch, seq), jnp.int32),
            "positions": jnp.asarray(positions, jnp.int32),
            "loss_mask": jnp.ones((1, batch, seq), jnp.float32)}


def _transformers_train(model, batch: dict, dtype_name: str):
    """tokens/s of transformers' forward + backward (sdpa, grouped_mm experts) on the same
    weights, or None without torch."""
    try:
        import torch
        from transformers import Glm4MoeForCausalLM
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/m")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = Glm4MoeForCausalLM.from_pretrained(
            f"{tmp}/m", dtype=getattr(torch, dtype_name), attn_implementation="sdpa",
            experts_implementation="grouped_mm").to(device).train()
    ids = torch.tensor(np.asarray(batch["input_ids"][0]), device=device)

    def run():
        reference.zero_grad(set_to_none=True)
        reference(input_ids=ids, labels=ids).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return ids.numel() / _time(run, repeats=2)


def train_bench(preset: str = "glm45_mini") -> None:
    """Our whole training step (forward, backward, Muon, balance-bias update): tokens/s, MFU,
    XLA's temporaries and the device's peak memory, beside transformers' forward + backward.
    On CPU the small `CPU_TRAIN_CONFIG` model at 8 x 256 tokens in float32; on an accelerator
    the preset at 2 x 4,096 tokens in bfloat16."""
    from glm_jax.optim import muon
    from glm_jax.train.flops import peak_flops, train_flops_per_token
    from glm_jax.train.step import StepConfig, TrainState, make_train_step

    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        name, dtype, rows, seq = "cpu_small", "float32", 8, 256
        config = ModelConfig.preset("tiny", **CPU_TRAIN_CONFIG)
    else:
        name, dtype, rows, seq = preset, "bfloat16", 2, 4096
        config = ModelConfig.preset(preset, dtype=dtype)
    model = nnx.jit(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))()
    batch = _train_batch(config, rows, seq)
    peer = _transformers_train(model, batch, dtype)
    optimizer = muon(1e-3)
    graphdef, state = TrainState.create(model, optimizer)
    del model
    step = make_train_step(graphdef, optimizer, StepConfig(mtp_weight=0.0, mtp_weight_after=0.0),
                           1e-3)
    compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    holder, losses = {"state": state}, []

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        losses.append(float(metrics["loss"]))  # waits for the step

    first, seconds = _time_first(run)
    tokens_per_s = rows * seq / seconds
    device = jax.devices()[0]
    record = {"bench": "train", "model": name, "device": device.device_kind, "dtype": dtype,
              "batch": rows, "seq": seq, "first_step_s": round(first, 3),
              "step_s": round(seconds, 4), "glm_jax_tokens_per_s": round(tokens_per_s, 1),
              "temp_GiB": round(memory.temp_size_in_bytes / 2**30, 3),
              "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
              "jax": jax.__version__}
    peak = peak_flops(device.device_kind)
    if peak:
        record["mfu"] = round(tokens_per_s * train_flops_per_token(config, seq) / peak, 4)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        record["peak_GiB"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    if peer is not None:
        record.update(transformers_tokens_per_s=round(peer, 1),
                      ratio=round(tokens_per_s / peer, 2))
    _emit(record)


def all_benchmarks(preset: str = "glm45_mini") -> None:
    """Every benchmark in one call (what a lent GPU runs)."""
    rewards_bench()
    decode(preset)
    kernels_bench(preset)
    train_bench(preset)


BENCHMARKS = {"decode": decode, "kernels": kernels_bench, "rewards": rewards_bench,
              "train": train_bench, "all": all_benchmarks}
