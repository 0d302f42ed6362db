"""Benchmarks, printed as JSON lines; peers are measured in the same run.

gmm: grouped matmul at the GLM-4.5-Air / GLM-4.5 expert shapes (a CPU-sized shape on CPU), per
direction (forward, input gradient, weight gradient) for each tokamax implementation, against
jax.lax.ragged_dot, the reference, torch._grouped_mm and the dense ceiling; forward+backward;
and the fastest tokamax implementation per direction (kernels.gmm.gpu.IMPLEMENTATIONS).
kernels: gmm, then routing vs its jnp reference.

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
import sys
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
# The three products of a grouped matmul and its gradient (kernels.gmm.gpu.DIRECTIONS).
GMM_DIRECTIONS = ("fwd", "dlhs", "drhs")


def _group_sizes(rows: int, groups: int, rng) -> np.ndarray:
    """Imbalanced but realistic loads: Dirichlet(1) shares (a few experts 3-4x the mean)."""
    sizes = np.floor(rng.dirichlet(np.ones(groups)) * rows).astype(np.int32)
    sizes[0] += rows - sizes.sum()
    return sizes


def _jax_timer(fn, *args):
    jitted = jax.jit(fn)
    return _time(lambda: jax.block_until_ready(jitted(*args)))


def _torch_grouped_mm(lhs, rhs, sizes):
    """{direction or "fwd_bwd": seconds} of torch._grouped_mm on CUDA (bf16), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    a = torch.randn(lhs.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(rhs.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn((lhs.shape[0], rhs.shape[2]), device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)
    products = {
        "fwd": lambda: torch._grouped_mm(a, b, offs=offsets),
        "dlhs": lambda: torch._grouped_mm(dy, b.transpose(-2, -1), offs=offsets),
        "drhs": lambda: torch._grouped_mm(a.t(), dy, offs=offsets),  # [G, K, N]
        "fwd_bwd": lambda: torch._grouped_mm(a, b, offs=offsets).sum().backward(),
    }
    times = {}
    for label, product in products.items():
        def run(product=product, grad=label == "fwd_bwd"):
            with torch.set_grad_enabled(grad):
                product()
            torch.cuda.synchronize()

        try:
            times[label] = _time(run)
        except Exception:  # noqa: BLE001 - e.g. a torch without the ragged-K form
            continue
    return times


def _gmm_direction_candidates(sizes, on_cpu: bool, out_dtype) -> dict[str, dict]:
    """label -> {direction: fn(a, b) of that direction's operands}: fwd (lhs, rhs) -> [M, N],
    dlhs (dy, rhs) -> [M, K], drhs (lhs, dy) -> [G, K, N]."""
    from kernels.gmm import gpu

    gmm_pkg = sys.modules["kernels.gmm"]
    auto = gmm_pkg.BACKENDS[gmm_pkg._auto_backend()]

    def per_direction(call):
        return {d: (lambda a, b, d=d: call(d, a, b, sizes, out_dtype)) for d in GMM_DIRECTIONS}

    candidates = {}
    for impl in gpu.available_implementations():
        if impl == "xla" and not on_cpu:
            continue  # the same lax.ragged_dot_general as "lax.ragged_dot" below
        candidates[f"tokamax:{impl}"] = per_direction(
            lambda d, a, b, gs, dt, impl=impl: gpu.tokamax_call(d, impl, a, b, gs, dt))
    candidates["lax.ragged_dot"] = per_direction(gpu.lax_call)
    candidates["reference"] = per_direction(gpu.reference_call)
    candidates["kernels.gmm"] = {  # the auto backend's own kernels, as the custom VJP calls them
        "fwd": lambda a, b: auto.gmm(a, b, sizes, preferred_element_type=out_dtype),
        "dlhs": lambda a, b: auto.gmm(a, b, sizes, preferred_element_type=out_dtype,
                                      transpose_rhs=True),
        "drhs": lambda a, b: auto.tgmm(a, b, sizes, preferred_element_type=out_dtype),
    }
    candidates["dense_matmul"] = {  # the same FLOPs as one dense matmul: the ceiling
        "fwd": lambda a, b: a @ b[0], "dlhs": lambda a, b: a @ b[0].T,
        "drhs": lambda a, b: (a.T @ b)[None]}
    return candidates


def _gmm_fwd_bwd_candidates(sizes) -> dict:
    """label -> fn(lhs, rhs) whose forward + backward is timed: kernels.gmm (auto), jax's and
    tokamax's own VJPs (tokamax with implementation=None: both gradients on the forward's
    backend), and the reference through kernels.gmm."""
    import kernels

    candidates = {
        "kernels.gmm": lambda x, w: kernels.gmm(x, w, sizes),
        "kernels.gmm[reference]": lambda x, w: kernels.gmm(x, w, sizes, backend="reference"),
        "lax.ragged_dot": lambda x, w: jax.lax.ragged_dot(x, w, sizes),
    }
    try:
        import tokamax
        candidates["tokamax.ragged_dot"] = lambda x, w: tokamax.ragged_dot(x, w, sizes)
    except ImportError:
        pass
    return candidates


def gmm_bench(preset: str = "") -> None:
    """Grouped-matmul timings per direction -- forward (lhs @ rhs[g]), input gradient
    (dy @ rhs[g]ᵀ), weight gradient (lhs_gᵀ @ dy_g) -- for each tokamax implementation this
    platform has, jax.lax.ragged_dot, our reference, kernels.gmm's auto backend,
    torch._grouped_mm (CUDA torch) and the dense matmul of the same FLOPs; then forward+backward
    TFLOP/s of the differentiable ops; then, per shape, the fastest tokamax implementation per
    direction (the `kernels.gmm.gpu.IMPLEMENTATIONS` table to write down). GLM-4.5(-Air) expert
    shapes in bf16 on an accelerator, a CPU-sized shape in float32 on CPU."""
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
    for shape_index, (name, rows, k, n, groups) in enumerate(
            CPU_GMM_SHAPES if on_cpu else GMM_SHAPES):
        sizes = jnp.asarray(_group_sizes(rows, groups, rng))
        lhs = jnp.asarray(rng.normal(size=(rows, k)), dtype)
        rhs = jnp.asarray(rng.normal(size=(groups, k, n)) / np.sqrt(k), dtype)
        dy = jnp.asarray(rng.normal(size=(rows, n)), dtype)
        operands = {"fwd": (lhs, rhs), "dlhs": (dy, rhs), "drhs": (lhs, dy)}
        flops = 2 * rows * k * n  # each direction does the same FLOPs
        base = {"bench": "gmm", "shape": name, "rows": rows, "k": k, "n": n, "experts": groups,
                "device": device, "dtype": jnp.dtype(dtype).name, "jax": jax.__version__}
        timings: dict[str, dict[str, float]] = {}
        for label, fns in _gmm_direction_candidates(sizes, on_cpu, dtype).items():
            # On an accelerator the slow paths (a serial scan; a densely lowered ragged_dot
            # that may not fit) run on the first shape only.
            if not on_cpu and shape_index and label in ("reference", "lax.ragged_dot"):
                continue
            for direction, fn in fns.items():
                try:
                    seconds = _jax_timer(fn, *operands[direction])
                except Exception as error:  # noqa: BLE001 - a refusal or out of memory
                    _emit({**base, "impl": label, "direction": direction,
                           "error": f"{type(error).__name__}: {str(error)[:200]}"})
                    continue
                timings.setdefault(label, {})[direction] = seconds
        torch_times = _torch_grouped_mm(lhs, rhs, np.asarray(sizes))
        if torch_times:
            timings["torch._grouped_mm"] = {d: s for d, s in torch_times.items()
                                            if d in GMM_DIRECTIONS}
        for label, per in timings.items():
            for direction, seconds in per.items():
                _emit({**base, "impl": label, "direction": direction,
                       "ms": round(seconds * 1e3, 3),
                       "tflops": round(flops / seconds / 1e12, 3)})
        fwd_bwd = {}
        for label, fn in _gmm_fwd_bwd_candidates(sizes).items():
            if not on_cpu and shape_index and label in ("kernels.gmm[reference]",
                                                        "lax.ragged_dot"):
                continue
            loss = lambda x, w, fn=fn: jnp.sum(fn(x, w).astype(jnp.float32))
            try:
                forward = _jax_timer(fn, lhs, rhs)
                both = _jax_timer(jax.grad(loss, argnums=(0, 1)), lhs, rhs) + forward
            except Exception as error:  # noqa: BLE001 - e.g. out of memory
                _emit({**base, "impl": label, "direction": "fwd_bwd",
                       "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            fwd_bwd[label] = both
        if torch_times and "fwd_bwd" in torch_times:
            fwd_bwd["torch._grouped_mm"] = torch_times["fwd_bwd"]
        ours = fwd_bwd.get("kernels.gmm")
        for label, seconds in fwd_bwd.items():
            record = {**base, "impl": label, "direction": "fwd_bwd",
                      "ms": round(seconds * 1e3, 3),
                      "tflops": round(3 * flops / seconds / 1e12, 3)}
            if ours and label != "kernels.gmm":
                record["kernels_gmm_speedup"] = round(seconds / ours, 2)
            _emit(record)
        table = {}
        for direction in GMM_DIRECTIONS:
            measured = {label.split(":", 1)[1]: per[direction]
                        for label, per in timings.items()
                        if label.startswith("tokamax:") and direction in per}
            if measured:
                table[direction] = min(measured, key=measured.get)
        _emit({**base, "bench": "gmm_table", "implementations": table})


def kernels_bench(preset: str = "") -> None:
    """gmm_bench (grouped matmul per direction and forward+backward), then routing time
    against the jnp reference."""
    import jax.numpy as jnp

    import kernels
    from kernels.routing import reference as routing_reference

    gmm_bench(preset)
    on_cpu = jax.default_backend() == "cpu"
    rng = np.random.default_rng(0)
    device = jax.devices()[0].device_kind
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
# No MTP layer in `train` (transformers' Glm4MoeForCausalLM has none to run). Our side runs
# its fastest CPU setting, the layers unrolled, as transformers runs its fastest.
CPU_TRAIN_CONFIG = dict(hidden_size=256, num_hidden_layers=4, n_routed_experts=16,
                        num_experts_per_tok=4, intermediate_size=512, moe_intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                        unroll_layers=True)


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
        config = ModelConfig.preset("tiny", **CPU_TRAIN_CONFIG, num_nextn_predict_layers=0)
    else:
        name, dtype, rows, seq = preset, "bfloat16", 2, 4096
        config = ModelConfig.preset(preset, dtype=dtype, num_nextn_predict_layers=0)
    model = nnx.jit(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0)))()
    batch = _train_batch(config, rows, seq)
    peer = _transformers_train(model, batch, dtype)
    fwd_bwd_s = _time(_fwd_bwd(model, batch))
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
              "glm_jax_fwd_bwd_tokens_per_s": round(rows * seq / fwd_bwd_s, 1),
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
                      ratio=round(tokens_per_s / peer, 2),
                      ratio_fwd_bwd=round(rows * seq / fwd_bwd_s / peer, 2))
    _emit(record)


def _fwd_bwd(model, batch: dict):
    """Our forward + backward alone (the mean cross-entropy of the main head, no MTP, no
    optimizer): what transformers' side of `train` measures. -> a callable that waits."""
    from glm_jax.train.step import token_cross_entropy

    graphdef, state = nnx.split(model)
    ids, targets = batch["input_ids"][0], batch["target_ids"][0]

    def loss(state):
        logits = nnx.merge(graphdef, state).forward(ids).logits
        return token_cross_entropy(logits, targets, jnp.ones(targets.shape)) / targets.size

    grad = jax.jit(jax.grad(loss))
    return lambda: jax.block_until_ready(grad(state))


def all_benchmarks(preset: str = "glm45_mini") -> None:
    """Every benchmark in one call (what a lent GPU runs)."""
    rewards_bench()
    decode(preset)
    kernels_bench(preset)
    train_bench(preset)


BENCHMARKS = {"decode": decode, "gmm": gmm_bench, "kernels": kernels_bench, "rewards": rewards_bench,
              "train": train_bench, "all": all_benchmarks}
