"""`sft(config)`: chat supervised fine-tuning with hybrid thinking, on the pre-training loop.

Conversations (the built-in verifiable tasks, or a JSONL of OpenAI-style chats) are rendered
through the GLM-4.5 template, a configured fraction in non-thinking mode, tokenised with the
loss on the assistant's tokens only (glm_jax.data.chat), packed with segment ids and trained
with the same jitted step, optimizer, checkpoints and metrics as pre-training. The starting
policy is a training workdir, a Hugging Face directory, or (tiny configs) a fresh model; a
workdir without a checkpoint is first trained by the SFT config `init_sft_config` names, so
configs chain (`sft_tiny_agentic` continues `sft_tiny`, GRPO continues either).
Held-out task accuracy and the bits per byte of the worked held-out conversations (thinking:
`eval_*`, non-thinking: `eval_nothink_*`) are logged at the start, every `eval.every` steps and
at the end, by the evaluation harness the `eval` command and the RL loop use.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import grain
import jax
from absl import logging

from glm_jax import data as data_lib
from glm_jax.convert import load_hf
from glm_jax.data import chat as chat_data
from glm_jax.data import tasks
from glm_jax.data.packing import pack
from glm_jax.data.tokenizer import check_chat_tokens
from glm_jax.errors import ConfigError
from glm_jax.rl.evaluate import evaluate_model
from glm_jax.rl.rewards import RewardPool
from glm_jax.train import config as config_lib
from glm_jax.train.loop import (build_optimizer, init_state, load_workdir, model_config,
                                save_model_config, step_config, train, training_mesh)
from glm_jax.train.step import TrainState, make_train_step


def sft_base_config():
    """pre-training's fields plus the SFT data, the starting policy and the evaluation."""
    import ml_collections

    config = config_lib.base_config()
    config.workdir = "workdir/sft"
    config.init = ""  # a training workdir or a Hugging Face directory; "" = a fresh model
    config.init_sft_config = ""  # an SFT config (file.py[:arg]) run into `init` when it is empty
    config.sft = ml_collections.ConfigDict(dict(
        data="builtin",  # "builtin" (glm_jax.data.tasks) or a JSONL of conversations
        kinds=",".join(tasks.KINDS),  # built-in task kinds
        train_problems=20_000,
        nothink_fraction=0.25,  # conversations rendered in non-thinking mode
        flawed_fraction=0.0,  # built-in problems worked by a careless teacher (tasks.flawed)
        on_bad_record="raise",  # or "skip"
        packing="best_fit",
    ))
    config.eval = ml_collections.ConfigDict(dict(
        every=100,  # steps between held-out evaluations (0 = start and end only)
        task="builtin",  # "builtin", a JSONL of prompts (tasks.load_problems), or "" (off)
        problems=64,
        max_new_tokens=64,
        batch_size=64,
        nothink=True,  # also score in non-thinking mode (eval_nothink_*)
        reward_workers=2,
    ))
    config.step.mtp_weight = 0.0  # SFT trains the main head; the MTP layer is left as it is
    config.step.mtp_weight_after = 0.0
    config.step.bias_rate = 0.0  # routing balance is pre-training's job
    config.data = ml_collections.ConfigDict()  # pre-training's corpus is not used
    return config


def validate_sft(config) -> None:
    config_lib.check_int(config, "steps", 1)
    config_lib.check_int(config, "log_every", 1)
    config_lib.check_int(config, "checkpoint_every", 1)
    config_lib.check_int(config, "keep_checkpoints", 1)
    config_lib.check_batches(config)
    config_lib.check_optimizer(config)
    config_lib.check_mesh(config)
    config_lib.check_int(config, "eval.every", 0)
    config_lib.check_int(config, "eval.problems", 1)
    config_lib.check_int(config, "eval.max_new_tokens", 1)
    config_lib.check_int(config, "eval.batch_size", 1)
    config_lib.check_int(config, "eval.reward_workers", 0)
    for field in ("nothink_fraction", "flawed_fraction"):
        config_lib.check_float(config, f"sft.{field}")
        if config.sft[field] > 1:
            raise ConfigError(f"config.sft.{field}: must be in [0, 1]")
    if config.sft.packing not in ("concat_then_split", "best_fit"):
        raise ConfigError(f"config.sft.packing: 'concat_then_split' or 'best_fit', got "
                          f"{config.sft.packing!r}")
    if config.sft.data == "builtin":
        config_lib.check_int(config, "sft.train_problems", 1)
        _kinds(config)
    elif not Path(config.sft.data).is_file():
        raise ConfigError(f"config.sft.data: {config.sft.data!r} is neither 'builtin' nor a file")
    if config.eval.task not in ("builtin", "") and not Path(config.eval.task).is_file():
        raise ConfigError(f"config.eval.task: {config.eval.task!r} is not 'builtin', '' or a file")
    check_init_sft_config(config)
    if config.init and not config.init_sft_config and not Path(config.init).is_dir():
        raise ConfigError(f"config.init: {config.init!r} is not a directory (and no "
                          "init_sft_config to create it)")
    if not config.init:
        config_lib.check_tokenizer(config, (Path(config.workdir) / "tokenizer.json").exists())


def check_init_sft_config(config) -> None:
    """config.init_sft_config is empty or names an existing config file."""
    path = split_config_arg(config.init_sft_config)[0]
    if config.init_sft_config and not Path(path).is_file():
        raise ConfigError(f"config.init_sft_config: {config.init_sft_config!r} is not a file")


def split_config_arg(spec: str) -> tuple[str, str | None]:
    """`file.py[:arg]` -> (file, arg), as `--config=file.py:arg` reads it."""
    path, sep, arg = spec.rpartition(":")
    return (path, arg) if sep and path.endswith(".py") else (spec, None)


def has_checkpoint(workdir: Path) -> bool:
    checkpoints = Path(workdir) / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def load_config(config_spec: str):
    """The config of `config_spec` (`file.py[:arg]`), as `--config=file.py:arg` reads it."""
    config_file, arg = split_config_arg(config_spec)
    spec = importlib.util.spec_from_file_location("_init_sft_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def run_sft_config(workdir: Path, config_spec: str) -> None:
    """Runs the SFT config `config_spec` (`file.py[:arg]`) with its workdir set to `workdir`
    (resumes if begun)."""
    sft_config = load_config(config_spec)
    sft_config.workdir = str(workdir)
    logging.warning("no policy at %s: running the SFT config %s first", workdir, config_spec)
    sft(sft_config)



def _kinds(config) -> tuple[str, ...]:
    return tasks.parse_kinds(config.sft.kinds, "config.sft.kinds")


def conversations(config) -> list[dict]:
    if config.sft.data == "builtin":
        problems = tasks.problems("train", config.sft.train_problems, kinds=_kinds(config),
                                  seed=config.seed)
        careless = random.Random(f"{config.seed}:flawed")  # one draw per problem, in order
        return [tasks.conversation(tasks.flawed(p) if careless.random() < config.sft.flawed_fraction
                                   else p) for p in problems]
    return chat_data.load_conversations(config.sft.data, on_bad_record=config.sft.on_bad_record)


def heldout_problems(config) -> list:
    if config.eval.task == "builtin":
        kinds = _kinds(config) if config.sft.data == "builtin" else tasks.KINDS
        return tasks.problems("heldout", config.eval.problems, kinds=kinds, seed=config.seed)
    if config.eval.task:
        return tasks.load_problems(config.eval.task)[:config.eval.problems]
    return []


def _tokenizer(config, workdir: Path, records: list[dict]):
    """The starting policy's tokenizer, the configured file, or (train_tokenizer) a BPE of the
    rendered training conversations, cached in the workdir."""
    if config.init:
        path = Path(config.init) / "tokenizer.json"
    elif config.tokenizer_path:
        path = Path(config.tokenizer_path)
    else:
        path = workdir / "tokenizer.json"
        if not path.exists():
            texts = (chat_data.render_text(r, thinking=i % 2 == 0) for i, r in enumerate(records))
            data_lib.train_bpe(texts, config.tokenizer_vocab_size, path)
    if not path.is_file():
        raise ConfigError(f"no tokenizer at {path}")
    tokenizer = data_lib.load_tokenizer(path)
    check_chat_tokens(tokenizer, path)
    if not (workdir / "tokenizer.json").exists():
        (workdir / "tokenizer.json").write_text(path.read_text())  # the workdir loads alone
    return tokenizer


def pipeline(config, records: list[dict], tokenizer) -> grain.IterDataset:
    """This process's packed micro-batch rows, endlessly, reshuffled each epoch; each
    conversation is rendered in non-thinking mode with probability nothink_fraction."""
    processes = jax.process_count()
    docs = grain.MapDataset.source(records)[jax.process_index()::processes]
    docs = docs.shuffle(seed=config.seed).repeat(None)

    def features(record, rng):
        thinking = rng.random() >= config.sft.nothink_fraction
        ids, assistant = chat_data.tokenize_conversation(tokenizer, record, thinking=thinking)
        return chat_data.sft_features(ids, assistant)

    stream = docs.random_map(features, seed=config.seed).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
    rows = pack(stream, config.seq_len, method=config.sft.packing, seed=config.seed)
    return rows.batch(config.batch_size // config.micro_batches // processes, drop_remainder=True)


def _start_state(config, tokenizer, optimizer, mesh):
    """-> (graphdef, TrainState, model config) from config.init or a fresh model."""
    if not config.init:
        model_cfg = model_config(config, tokenizer.get_vocab_size())
        graphdef, state = init_state(config, model_cfg, optimizer, mesh)
        return graphdef, state, model_cfg
    init = Path(config.init)
    if (init / "config.json").exists():
        model = load_hf(init, mesh=mesh)
    else:
        model, _ = load_workdir(init, mesh=mesh)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ConfigError(f"config.init: the tokenizer has {tokenizer.get_vocab_size()} tokens, "
                          f"the model's vocabulary {model.config.vocab_size}")
    graphdef, state = TrainState.create(model, optimizer)
    return graphdef, state, model.config


def sft(config) -> list[dict]:
    """Runs until `config.steps`; resumes from the workdir's checkpoint; returns the logged
    metrics (training rows and eval_* rows)."""
    validate_sft(config)
    if config.init and not (Path(config.init) / "config.json").exists() and not has_checkpoint(
            Path(config.init)):
        if not config.init_sft_config:
            raise ConfigError(f"config.init: {config.init} holds no checkpoint")
        run_sft_config(Path(config.init), config.init_sft_config)
    workdir = Path(config.workdir)
    records = conversations(config)
    heldout = heldout_problems(config)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(config, workdir, records)
    optimizer, schedule = build_optimizer(config)
    mesh = training_mesh(config)
    graphdef, state, model_cfg = _start_state(config, tokenizer, optimizer, mesh)
    config_lib.check_step(config, model_cfg)
    save_model_config(workdir, model_cfg)
    train_step = make_train_step(graphdef, optimizer, step_config(config), schedule)
    evaluate = None
    pool = RewardPool(workers=config.eval.reward_workers)
    if heldout:
        modes = ("think", "nothink") if config.eval.nothink else ("think",)

        def evaluate(model):
            rows = evaluate_model(model, tokenizer, heldout, pool, modes=modes,
                                  max_new_tokens=config.eval.max_new_tokens,
                                  batch_size=config.eval.batch_size, seed=config.seed)
            results = {}
            for row in rows:
                prefix = "eval_" if row["mode"] == "think" else "eval_nothink_"
                results.update({prefix + k: v for k, v in row.items() if k != "mode"})
            results.update(pool.stats.as_metrics("eval_reward_"))
            return results
    logging.info("SFT on %d conversations, %d held-out problems", len(records), len(heldout))
    try:
        return train(config, workdir, graphdef, state, train_step,
                     pipeline(config, records, tokenizer), mesh, model_cfg, evaluate=evaluate)
    finally:
        pool.close()
