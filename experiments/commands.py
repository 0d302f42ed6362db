"""The launcher's commands; each takes the parsed absl flags. Every command checks what it was
given before doing anything expensive."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from glm_jax import load_hf
from glm_jax.errors import InputError


class Command(NamedTuple):
    run: Callable
    flags: tuple[str, ...]  # the flags it reads, for `CMD --help`
    default_config: Callable | None = None  # its config when --config is not given

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0]


def _demo_config():
    from configs import demo_tiny

    return demo_tiny.get_config()


# The demo's fill-in-the-middle probe: the model writes the line between prefix and suffix.
FIM_PREFIX = "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"
FIM_SUFFIX = "\n\n    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n"


def demo(flags) -> None:
    """Pre-train the tiny model on the local Python stdlib (CPU, minutes; resumes), then sample.

    Prints held-out bits per byte before and after, a sample, a fill-in-the-middle completion,
    and where the TensorBoard logs, checkpoint and PNGs (loss curve, expert load) are."""
    from glm_jax.data import CODE_MIDDLE, CODE_PREFIX, CODE_SUFFIX, EOT
    from glm_jax.infer import generate as run_generation
    from glm_jax.train.loop import load_workdir, pretrain
    from glm_jax.train.metrics import read_records, write_loss_curve

    config = flags.config or _demo_config()
    config.workdir = flags.workdir or config.workdir
    workdir = Path(config.workdir)
    sampling = _sampling(flags)
    logged = pretrain(config)
    if logged:
        steps = [r for r in logged if "loss" in r]
        print(f"trained steps {steps[0]['step']}-{steps[-1]['step']}: loss "
              f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
    records = read_records(workdir / "metrics.jsonl", config.steps)
    print(_bits_per_byte_line(records, config))
    model, tokenizer = load_workdir(workdir)
    fim = f"{CODE_PREFIX}{FIM_PREFIX}{CODE_SUFFIX}{FIM_SUFFIX}{CODE_MIDDLE}"
    out = run_generation(model, [tokenizer.encode(p).ids for p in (flags.prompt, fim)],
                         max_new_tokens=flags.steps, sampling=sampling,
                         stop_tokens=[tokenizer.token_to_id(EOT)], seeds=[flags.seed] * 2)
    sample, middle = (tokenizer.decode(out.tokens[i, :out.lengths[i]].tolist()) for i in (0, 1))
    print(f"sample (temperature {flags.temperature}):\n{flags.prompt + sample}")
    print(f"fill-in-the-middle, the model's middle in [[ ]]:\n"
          f"{FIM_PREFIX}[[{middle}]]{FIM_SUFFIX}")
    write_loss_curve(records, workdir / "loss.png")
    print(f"TensorBoard logs: {workdir / 'tensorboard'}  (tensorboard --logdir {workdir})\n"
          f"checkpoint: {workdir / 'checkpoints' / str(config.steps)}\n"
          f"PNGs: {workdir / 'loss.png'} {workdir / 'expert_load.png'}")


def _bits_per_byte_line(records: list[dict], config) -> str:
    scores = [r for r in records if "eval_bits_per_byte" in r]
    if not scores:
        return "held-out bits per byte: not measured (config.eval.heldout_chars = 0)"
    first, last = scores[0], scores[-1]
    return (f"held-out stdlib code ({config.eval.heldout_chars:,} characters of modules never "
            f"trained on): {first['eval_bits_per_byte']:.3f} bits per byte at step "
            f"{first['step']} -> {last['eval_bits_per_byte']:.3f} at step {last['step']}")


def convert(flags) -> None:
    """Load a Hugging Face checkpoint (a strict check of every tensor) and summarise it."""
    model = load_hf(_checkpoint_dir(flags.checkpoint))
    counts = model.config.param_counts()
    print(model.config)
    print(f"loaded {counts['total']:,} parameters ({counts['active']:,} active per token)")


def pretrain(flags) -> None:
    """Pre-train per --config (configs/pretrain_*.py); resumes from the workdir's checkpoint."""
    from glm_jax.train.loop import pretrain as run

    if flags.config is None:
        raise InputError("pretrain needs --config=configs/<name>.py")
    logged = run(flags.config)
    if logged:
        first, last = logged[0], logged[-1]
        print(f"steps {first['step']}-{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}, "
              f"max_vio {first.get('max_vio', float('nan')):.3f} -> {last.get('max_vio', float('nan')):.3f}")


def sft(flags) -> None:
    """Chat SFT with hybrid thinking per --config (configs/sft_*.py); resumes; logs eval_* rows."""
    from glm_jax.train.sft import sft as run

    if flags.config is None:
        raise InputError("sft needs --config=configs/<name>.py")
    logged = run(flags.config)
    losses = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "eval_accuracy" in r]
    if losses:
        print(f"steps {losses[0]['step']}-{losses[-1]['step']}: loss {losses[0]['loss']:.4f} -> "
              f"{losses[-1]['loss']:.4f}")
    for row in evals:
        print(f"step {row['step']}: held-out accuracy {row['eval_accuracy']:.3f} (thinking), "
              f"{row.get('eval_nothink_accuracy', float('nan')):.3f} (non-thinking)")


def grpo(flags) -> None:
    """GRPO / DAPO / Dr. GRPO per --config (configs/grpo_*.py[:preset]); resumes; eval_reward rows."""
    from glm_jax.rl.loop import grpo as run

    if flags.config is None:
        raise InputError("grpo needs --config=configs/<name>.py")
    logged = run(flags.config)
    evals = [r for r in logged if "eval_reward" in r]
    steps = [r for r in logged if "reward_mean" in r]
    if steps:
        rollout = sum(r["rollout_seconds"] for r in steps)
        training = sum(r["train_seconds"] for r in steps)
        print(f"steps {steps[0]['step']}-{steps[-1]['step']}: rollout reward "
              f"{steps[0]['reward_mean']:.3f} -> {steps[-1]['reward_mean']:.3f}; "
              f"{rollout:.0f} s rollout, {training:.0f} s training")
    for row in evals:
        print(f"step {row['step']}: held-out reward {row['eval_reward']:.3f}")


def _problems(flags):
    """The --task's prompts: the built-in task family's --split, or a JSONL of prompts."""
    from glm_jax.data import tasks

    if flags.problems < 1:
        raise InputError(f"--problems must be >= 1, got {flags.problems}")
    if flags.task == "builtin":
        if flags.split not in ("train", "heldout"):
            raise InputError(f"--split must be 'train' or 'heldout', got {flags.split!r}")
        return tasks.problems(flags.split, flags.problems, seed=flags.seed,
                              kinds=tasks.parse_kinds(flags.kinds, "--kinds"))
    if not Path(flags.task).is_file():
        raise InputError(f"--task {flags.task!r}: neither 'builtin' nor a file")
    return tasks.load_problems(flags.task)[:flags.problems]


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise InputError(f"--{name} must be comma-separated integers >= 1, got {text!r}")
    return values


def evaluate(flags) -> None:
    """Score --checkpoint on --task: pass@k, accuracy, function calls, bits per byte; both modes."""
    from glm_jax.rl.evaluate import evaluate_model
    from glm_jax.rl.rewards import RewardPool

    ks = _ints(flags.k, "k")
    modes = tuple(m.strip() for m in flags.modes.split(",") if m.strip())
    if not modes or set(modes) - {"think", "nothink"}:
        raise InputError(f"--modes must be among think,nothink, got {flags.modes!r}")
    if flags.samples < max(ks):
        raise InputError(f"--samples {flags.samples} is fewer than the largest k {max(ks)}")
    if flags.samples > 1 and flags.temperature == 0:
        raise InputError("--samples > 1 with --temperature=0 draws the same answer n times")
    problems = _problems(flags)
    texts = _read_texts(flags.text) if flags.text else ()
    model, tokenizer = load_for_inference(flags.checkpoint)
    with RewardPool(workers=flags.reward_workers) as pool:
        rows = evaluate_model(model, tokenizer, problems, pool, modes=modes, texts=texts,
                              n=flags.samples, ks=ks, temperature=flags.temperature,
                              max_new_tokens=flags.steps, batch_size=flags.batch_size,
                              seed=flags.seed)
        stats = pool.stats
    for row in rows:
        print(json.dumps({"checkpoint": flags.checkpoint, "task": flags.task, **row}))
    print(_table(rows))
    print(f"rewards: {stats.scored} scored at {stats.scored / max(stats.seconds, 1e-9):.0f}/s, "
          f"{stats.errors} raised, {stats.timeouts} timed out")


def _read_texts(path: str) -> list[str]:
    """Held-out text for bits per byte: a .jsonl file's "text" fields, else the whole file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--text {path}: no such file")
    if file.suffix != ".jsonl":
        return [file.read_text(encoding="utf-8")]
    texts = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{number}: needs a JSON object with 'text' ({e})") from None
    return texts


def _table(rows: list[dict]) -> str:
    columns = ["mode"] + sorted({k for r in rows for k in r} - {"mode"})
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["mode"]] + [f"{row[c]:.4g}" if c in row else "" for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def distill(flags) -> None:
    """Rejection-sample --teachers on --task, keep the verified longer half: an SFT JSONL at --out."""
    from glm_jax.rl.distill import sample_candidates, select_for_distillation, to_record, write_jsonl
    from glm_jax.rl.rewards import RewardPool

    teachers = [t for t in (flags.teachers or "").split(",") if t]
    if not teachers:
        raise InputError("distill needs --teachers=DIR[,DIR...] (training workdirs or HF dirs)")
    if not flags.out:
        raise InputError("distill needs --out=FILE.jsonl")
    if flags.temperature <= 0 and flags.samples > 1:
        raise InputError("--samples > 1 needs --temperature > 0 (greedy repeats one answer)")
    problems = _problems(flags)
    candidates = []
    with RewardPool(workers=flags.reward_workers) as pool:
        for teacher in teachers:
            model, tokenizer = load_for_inference(teacher, "--teachers")
            candidates += sample_candidates(teacher, model, tokenizer, problems, pool,
                                            n=flags.samples, temperature=flags.temperature,
                                            max_new_tokens=flags.steps,
                                            batch_size=flags.batch_size, seed=flags.seed)
    kept = select_for_distillation(candidates)
    write_jsonl([to_record(c) for c in kept], flags.out)
    verified = sum(c.reward >= 1 for c in candidates)
    print(f"{len(candidates)} responses to {len(problems)} prompts, {verified} verified, "
          f"{len(kept)} kept (the longer half per prompt) -> {flags.out}")


def _checkpoint_dir(checkpoint: str | None, flag: str = "--checkpoint") -> Path:
    if not checkpoint:
        raise InputError(f"needs {flag}=DIR (a Hugging Face directory or a training workdir)")
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"{flag} {path}: no such directory")
    return path


def load_for_inference(checkpoint: str | None, flag: str = "--checkpoint"):
    """-> (model, tokenizer) from a Hugging Face directory (config.json, safetensors,
    tokenizer.json) or a training workdir (its model config, tokenizer and newest checkpoint).
    Nothing is created or trained."""
    from glm_jax.data import load_tokenizer
    from glm_jax.train.loop import load_workdir

    path = _checkpoint_dir(checkpoint, flag)
    if (path / "config.json").exists():
        if not (path / "tokenizer.json").is_file():
            raise InputError(f"{flag} {path}: no tokenizer.json beside config.json")
        tokenizer = load_tokenizer(path / "tokenizer.json")
        model = load_hf(path)
    elif (path / "checkpoints").is_dir():
        model, tokenizer = load_workdir(path)
    else:
        raise InputError(f"{flag} {path}: neither a Hugging Face checkpoint (config.json) "
                         "nor a training workdir (checkpoints/)")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise InputError(f"{flag} {path}: the tokenizer has {tokenizer.get_vocab_size()} "
                         f"tokens, more than the model's vocab_size {model.config.vocab_size}")
    return model, tokenizer


def _sampling(flags):
    from glm_jax.infer import SamplingConfig

    return SamplingConfig(temperature=flags.temperature, top_k=flags.top_k, top_p=flags.top_p)


def _stop_ids(tokenizer) -> list[int]:
    from glm_jax.data import EOT

    names = (EOT, "<|user|>", "<|observation|>")
    return [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]


def generate(flags) -> None:
    """Stream a continuation of --prompt from --checkpoint (Hugging Face dir or workdir)."""
    from glm_jax.infer import stream

    sampling = _sampling(flags)
    model, tokenizer = load_for_inference(flags.checkpoint)
    tokens = stream(model, tokenizer.encode(flags.prompt).ids, max_new_tokens=flags.steps,
                    sampling=sampling, stop_tokens=_stop_ids(tokenizer), seed=flags.seed)
    print(flags.prompt, end="", flush=True)
    for piece in decoded_pieces(tokenizer, tokens):
        print(piece, end="", flush=True)
    print()


def decoded_pieces(tokenizer, tokens):
    """Text as tokens arrive, decoded incrementally: a character split over several byte tokens
    comes out whole once its last byte arrives (re-decoding prefixes would print U+FFFD)."""
    from tokenizers.decoders import DecodeStream

    decoder = DecodeStream(skip_special_tokens=False)
    for token in tokens:
        piece = decoder.step(tokenizer, token)
        if piece is not None:
            yield piece


def chat(flags) -> None:
    """Chat on stdin (one user message per line, EOF quits) in GLM-4.5's format."""
    from glm_jax import parse_output, render_chat
    from glm_jax.infer import ChatSession

    sampling = _sampling(flags)
    tools = _read_tools(flags.tools) if flags.tools else None
    model, tokenizer = load_for_inference(flags.checkpoint)
    session = ChatSession(model, sampling=sampling, stop_tokens=_stop_ids(tokenizer),
                          seed=flags.seed)
    messages = []
    for line in sys.stdin:
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = render_chat(messages, tools=tools, add_generation_prompt=True,
                             enable_thinking=flags.thinking)
        tokens = session.reply(tokenizer.encode(prompt).ids, max_new_tokens=flags.steps)
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


def _read_tools(path: str) -> list:
    try:
        tools = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"--tools {path}: {e}") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InputError(f"--tools {path}: must hold a JSON list of tool definitions (objects)")
    return tools


def plan(flags) -> None:
    """Per-device memory of --config's training on a --mesh of virtual CPUs or TPU chips.

    --devices virtual CPUs, or the chips of a TPU --topology compiled for by libtpu (their
    count replaces --devices). --hbm_gib (TPU only) declares the chips' memory: with a whole v5p
    to spare the compiler takes far more than it needs, told less it schedules to fit."""
    import os

    if flags.hbm_gib is not None:
        if not flags.topology:
            raise InputError("--hbm_gib applies to a TPU plan: add --topology=...")
        if not flags.hbm_gib > 0:
            raise InputError(f"--hbm_gib must be > 0, got {flags.hbm_gib}")
        os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                          f" --xla_tpu_max_hbm_size_mib={int(flags.hbm_gib * 1024)}")
    # XLA:CPU stands in for an accelerator's compiler here. Its default scheduler starts work
    # early so that CPU threads overlap (the backward's zero-filled loop buffers are allocated
    # before the forward runs: 2 GiB more for GLM-4.5 at 128 devices), which a memory-minded
    # accelerator scheduler does not do. (As a compile option XLA:CPU ignores it.)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={flags.devices}"
                               " --xla_cpu_enable_concurrency_optimized_scheduler=false")
    os.environ["JAX_PLATFORMS"] = "cpu"
    from experiments.plan import memory_plan, tpu_devices
    from glm_jax import ModelConfig, sharding
    from kernels.backends import targeting

    if flags.config is None:
        raise InputError("plan needs --config=configs/<name>.py")
    try:
        mesh_shape = json.loads(flags.mesh)
    except json.JSONDecodeError as e:
        raise InputError(f"--mesh {flags.mesh!r}: not JSON ({e})") from e
    config = flags.config
    model_cfg = ModelConfig.preset(config.model.preset, **dict(config.model.overrides))
    devices = tpu_devices(flags.topology) if flags.topology else None
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    with targeting("tpu" if flags.topology else "cpu"):
        result = memory_plan(config, model_cfg, mesh, rows_per_device=flags.rows_per_device,
                             micro_batches=flags.micro_batches)
    target = f"TPU {flags.topology}" if flags.topology else f"{mesh.size} virtual CPUs"
    if flags.hbm_gib is not None:
        target += f" with {flags.hbm_gib:g} GiB of HBM each"
    print(json.dumps({"compiled_for": target, **result}))


def bench(flags) -> None:
    """Benchmarks as JSON lines, peers in the same run: --what=decode|kernels|rewards|train|all."""
    from experiments import bench as benchmarks

    if flags.what not in benchmarks.BENCHMARKS:
        raise InputError(f"--what must be one of {sorted(benchmarks.BENCHMARKS)}, got "
                         f"{flags.what!r}")
    benchmarks.BENCHMARKS[flags.what](flags.preset)


_SAMPLING = ("temperature", "top_k", "top_p", "seed")
COMMANDS = {
    "demo": Command(demo, ("config", "workdir", "prompt", "steps") + _SAMPLING, _demo_config),
    "pretrain": Command(pretrain, ("config",)),
    "sft": Command(sft, ("config",)),
    "grpo": Command(grpo, ("config",)),
    "eval": Command(evaluate, ("checkpoint", "task", "split", "problems", "samples", "k", "modes",
                               "text", "steps", "batch_size", "reward_workers") + _SAMPLING),
    "distill": Command(distill, ("teachers", "task", "split", "problems", "samples", "out",
                                 "steps", "batch_size", "reward_workers") + _SAMPLING),
    "generate": Command(generate, ("checkpoint", "prompt", "steps") + _SAMPLING),
    "chat": Command(chat, ("checkpoint", "steps", "thinking", "tools") + _SAMPLING),
    "convert": Command(convert, ("checkpoint",)),
    "plan": Command(plan, ("config", "devices", "topology", "hbm_gib", "mesh", "rows_per_device",
                           "micro_batches")),
    "bench": Command(bench, ("what", "preset")),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m experiments <command> [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "python -m experiments <command> --help: the command's flags and config fields"]
    return "\n".join(lines)


def command_help(name: str, flag_values) -> str:
    command = COMMANDS[name]
    lines = [f"python -m experiments {name}: {command.summary}", "", "flags:"]
    for flag in command.flags:
        entry = flag_values[flag]
        default = "(a config file)" if flag == "config" else repr(entry.default)
        lines.append(f"  --{flag}={default}  {entry.help}")
    config = flag_values.config or (command.default_config() if command.default_config else None)
    if config is not None:
        lines += ["", "config fields (--config.NAME=VALUE):"]
        lines += [f"  {key} = {value!r}" for key, value in _flatten(config.to_dict())]
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
