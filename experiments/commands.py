"""The launcher's commands; each takes the parsed absl flags."""

from __future__ import annotations

from glm_jax import load_hf


def demo(flags) -> None:
    """The main job on its embedded default: pre-train the `tiny` model on the local Python
    standard library (configs/pretrain_tiny.py; resumes if already run), then sample from it."""
    from configs import demo_tiny
    from glm_jax.train.loop import load_trained, pretrain

    config = flags.config or demo_tiny.get_config()
    config.workdir = flags.workdir or config.workdir
    logged = pretrain(config)
    if logged:
        print(f"trained steps {logged[0]['step']}-{logged[-1]['step']}: loss "
              f"{logged[0]['loss']:.3f} -> {logged[-1]['loss']:.3f}")
    model, tokenizer = load_trained(config)
    from glm_jax.infer import generate as run_generation

    out = run_generation(model, [tokenizer.encode(flags.prompt).ids], max_new_tokens=flags.steps,
                         sampling=_sampling(flags), seeds=[flags.seed])
    print(f"prompt: {flags.prompt!r}\nsample (temperature {flags.temperature}):\n"
          f"{flags.prompt + tokenizer.decode(out.tokens[0, :out.lengths[0]].tolist())}")


def convert(flags) -> None:
    """Loads a Hugging Face checkpoint (a strict check of every tensor) and summarises it."""
    if not flags.checkpoint:
        raise ValueError("convert needs --checkpoint=DIR")
    model = load_hf(flags.checkpoint)
    counts = model.config.param_counts()
    print(model.config)
    print(f"loaded {counts['total']:,} parameters ({counts['active']:,} active per token)")


def pretrain(flags) -> None:
    """Pre-trains per --config; resumes from the workdir's latest checkpoint."""
    from glm_jax.train.loop import pretrain as run

    if flags.config is None:
        raise ValueError("pretrain needs --config=configs/<name>.py")
    logged = run(flags.config)
    if logged:
        first, last = logged[0], logged[-1]
        print(f"steps {first['step']}-{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
              f"max_vio {first.get('max_vio', float('nan')):.3f} -> {last.get('max_vio', float('nan')):.3f}")


def load_for_inference(flags):
    """-> (model, tokenizer) from --checkpoint: a Hugging Face directory (config.json,
    safetensors, tokenizer.json) or a pre-training workdir (its latest Orbax checkpoint and
    tokenizer; the run's --config, default configs/pretrain_tiny.py)."""
    from pathlib import Path

    from configs import pretrain_tiny
    from glm_jax.data import load_tokenizer
    from glm_jax.train.loop import load_trained

    if not flags.checkpoint:
        raise ValueError("needs --checkpoint=DIR (a Hugging Face directory or a workdir)")
    path = Path(flags.checkpoint)
    if (path / "config.json").exists():
        return load_hf(path), load_tokenizer(path / "tokenizer.json")
    config = flags.config or pretrain_tiny.get_config()
    config.workdir = str(path)
    return load_trained(config)


def _sampling(flags):
    from glm_jax.infer import SamplingConfig

    return SamplingConfig(temperature=flags.temperature, top_k=flags.top_k, top_p=flags.top_p)


def _stop_ids(tokenizer) -> list[int]:
    from glm_jax.data import EOT

    names = (EOT, "<|user|>", "<|observation|>")
    return [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]


def generate(flags) -> None:
    """Streams a continuation of --prompt."""
    from glm_jax.infer import stream

    model, tokenizer = load_for_inference(flags)
    ids, text = tokenizer.encode(flags.prompt).ids, ""
    print(flags.prompt, end="", flush=True)
    tokens = []
    for token in stream(model, ids, max_new_tokens=flags.steps, sampling=_sampling(flags),
                        stop_tokens=_stop_ids(tokenizer), seed=flags.seed):
        tokens.append(token)
        full = tokenizer.decode(tokens)
        print(full[len(text):], end="", flush=True)  # print only what the new token added
        text = full
    print()


def chat(flags) -> None:
    """Interactive chat in GLM-4.5's format: one user message per line, EOF to quit."""
    import json
    import sys

    from glm_jax import parse_output, render_chat
    from glm_jax.infer import stream

    model, tokenizer = load_for_inference(flags)
    tools = json.loads(open(flags.tools).read()) if flags.tools else None
    messages = []
    for line in sys.stdin:
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = render_chat(messages, tools=tools, add_generation_prompt=True,
                             enable_thinking=flags.thinking)
        tokens = list(stream(model, tokenizer.encode(prompt).ids, max_new_tokens=flags.steps,
                             sampling=_sampling(flags), stop_tokens=_stop_ids(tokenizer),
                             seed=flags.seed))
        reply = parse_output(tokenizer.decode(tokens, skip_special_tokens=False))
        if reply["reasoning"]:
            print(f"[thinking] {reply['reasoning']}")
        print(f"assistant: {reply['content']}")
        for call in reply["tool_calls"]:
            print(f"[tool call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
        if reply["error"]:
            print(f"[unparsed reply: {reply['error']}]")
        messages.append({"role": "assistant", "content": reply["content"],
                         "reasoning_content": reply["reasoning"],
                         "tool_calls": [{"function": c} for c in reply["tool_calls"]]})


def plan(flags) -> None:
    """Per-device memory of --config's training on a virtual mesh of --devices CPU devices with
    --mesh axis sizes (JSON), e.g. --devices=128 --mesh='{"fsdp": 16, "expert": 8}'."""
    import json
    import os

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={flags.devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from experiments.plan import memory_plan
    from glm_jax import ModelConfig, sharding

    config = flags.config
    model_cfg = ModelConfig.preset(config.model.preset, **dict(config.model.overrides))
    mesh = sharding.make_mesh(json.loads(flags.mesh))
    print(json.dumps(memory_plan(config, model_cfg, mesh, rows_per_device=flags.rows_per_device)))


def bench(flags) -> None:
    """JSON-line benchmarks: --what=decode [--preset=glm45_mini], --what=kernels."""
    from experiments import bench as benchmarks

    if flags.what not in benchmarks.BENCHMARKS:
        raise ValueError(f"--what must be one of {sorted(benchmarks.BENCHMARKS)}")
    benchmarks.BENCHMARKS[flags.what](flags.preset)


COMMANDS = {"pretrain": pretrain, "demo": demo, "generate": generate, "chat": chat,
            "convert": convert, "plan": plan, "bench": bench}
