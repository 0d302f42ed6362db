"""`grpo(config)`: the reasoning-RL loop of GLM-4.5 (SPEC.md §4, §4b) on the pure `grpo_step`.

Each step: draw prompts, sample `group_size` completions of each with the current policy (the
KV-cache engine reads the training state's arrays directly: one device holds one copy of the
weights), score them, shape overlong answers, drop all-equal groups and refill (dynamic
sampling), compute group advantages, and take `updates_per_batch` jitted updates. Held-out
`eval_reward` (greedy, the evaluation harness) is logged at the start, every `eval.every` steps
and at the end, with a reward-curve PNG beside metrics.jsonl and TensorBoard; with
`eval.samples` = n > 0 also `eval_reward_sampled`, the mean reward of n completions per problem
at the rollout temperature (the policy as RL samples and optimises it: avg@n).

A run is a function of its config: step `s` samples with seeds derived from (seed, s, round)
and draws prompts from a seeded stream whose position is checkpointed with the policy and the
optimizer state, so a stopped run restarted with the same command logs what the uninterrupted
run would have. Single-process (one host, its local devices).

Presets (`configs/grpo_*.py:NAME`): `grpo` (GLM-4.5: no KL, eps 0.2 / 0.2, token-mean when
the task is code, else seq-mean-token-mean), `dapo` (clip-higher 0.2 / 0.28, token-mean,
dynamic sampling, overlong shaping), `dr_grpo` (no std scaling, seq-mean-token-scale).

GLM-4.5's recipe, each off by default: `rl.curriculum` (two stages by difficulty),
`rl.dynamic_temperature` (the rollout temperature re-chosen on held-out scores),
`rl.fp8_rollouts` (the sampler on the policy re-quantised to FP8, truncated importance weights)
and `rl.routing_replay` (the training forward uses the experts each token was routed to in the
rollout). With `rl.recompute_old_logp` (implied by FP8) the sampler/trainer log-prob mismatch is
logged as `rollout_logp_mismatch`.

Agentic RL (the report's RL with tools): with `rl.env` naming a tool environment
(glm_jax.rl.environments), the problems of the kinds it plays are rolled out as episodes of at
most `rl.max_turns` model turns (glm_jax.rl.agentic) and trained on the tokens the model wrote
only; the held-out score always plays them so.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.data import tasks
from glm_jax.convert import load_hf
from glm_jax.data.tokenizer import check_chat_tokens, load_tokenizer
from glm_jax.errors import ConfigError
from glm_jax.infer.engine import SamplingConfig
from glm_jax.infer.fp8 import quantize_model
from glm_jax.rl.agentic import EpisodeStats, rollout_with_environment
from glm_jax.rl.curriculum import (PassCountCache, count_correct, pick_temperature, plateaued,
                                   select_hard_prompts, select_moderate_prompts)
from glm_jax.rl.environments import ENVIRONMENTS, environment_for
from glm_jax.rl.evaluate import evaluate_tasks, pass_at_k, prompt_ids
from glm_jax.rl.grpo import GrpoConfig, make_grpo_step, make_policy_logp, rollout_batch
from glm_jax.rl.objectives import group_advantages
from glm_jax.rl.rewards import RewardPool
from glm_jax.rl.rollouts import Groups, Overlong, collect_groups
from glm_jax.train import config as config_lib
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.loop import (MODEL_CONFIG_FILE, build_optimizer, load_workdir,
                                save_model_config, training_mesh)
from glm_jax.train.metrics import MetricsLogger, read_records, write_reward_curve
from glm_jax.train.sft import check_init_sft_config, has_checkpoint, run_sft_config
from glm_jax.train.step import TrainState

PRESETS = {
    "grpo": dict(eps_low=0.2, eps_high=0.2, aggregation="auto", scale_by_std=True,
                 dynamic_sampling=False, overlong_cache=0, kl_beta=0.0),
    "dapo": dict(eps_low=0.2, eps_high=0.28, aggregation="token-mean", scale_by_std=True,
                 dynamic_sampling=True, overlong_cache=16, kl_beta=0.0),
    "dr_grpo": dict(eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-scale",
                    scale_by_std=False, dynamic_sampling=False, overlong_cache=0, kl_beta=0.0),
}


def grpo_base_config(algorithm: str = "grpo") -> ml_collections.ConfigDict:
    """The fields the GRPO loop reads, with `algorithm`'s preset applied."""
    if algorithm not in PRESETS:
        raise ConfigError(f"algorithm {algorithm!r}: the presets are {sorted(PRESETS)}")
    base = config_lib.base_config()
    config = ml_collections.ConfigDict()
    for field in ("seed", "mesh", "num_devices", "steps", "schedule_steps", "warmup_steps",
                  "peak_learning_rate", "floor_learning_rate", "weight_decay", "grad_clip",
                  "optimizer", "head_with_adam", "muon_ns_dtype", "momentum_dtype", "micro_batches",
                  "log_every", "checkpoint_every", "keep_checkpoints"):
        config[field] = base[field]
    config.workdir = "workdir/grpo"
    config.algorithm = algorithm
    config.init = ""  # the starting policy: an SFT (or any training) workdir, or a HF directory
    config.init_sft_config = ""  # an SFT config (file.py[:arg]) run into `init` when it is empty
    config.seq_len = 256  # training row width: prompt + completion - 1 tokens
    config.log_every = 1
    config.rl = ml_collections.ConfigDict(dict(
        task="builtin",  # "builtin" (glm_jax.data.tasks) or a JSONL of prompts with references
        kinds=",".join(tasks.KINDS),
        train_problems=20_000,
        group_size=8,  # G completions per prompt
        groups_per_step=8,
        max_rounds=4,  # dynamic sampling: rollout rounds per step at most
        temperature=1.0,
        max_new_tokens=64,
        thinking=True,
        rollout_batch_size=64,  # rows per generation call
        updates_per_batch=1,
        recompute_old_logp=False,  # old_logp from the trainer's forward instead of the sampler
        # FP8 rollouts (the report): the sampler runs on the policy re-quantised block-wise to
        # FP8 after every update; old_logp is recomputed by the trainer, and each token's loss
        # is weighted by min(exp(old_logp - rollout_logp), tis_cap) (truncated IS, detached).
        fp8_rollouts=False,
        tis_cap=2.0,
        # MoE routing replay (slime's rollout routing replay): the rollout records each token's
        # experts and the training forward uses them (weights still from the current router).
        routing_replay=False,
        clip_c=0.0,  # dual clip (> 1), 0 = off
        bias_rate=0.0,  # MoE balance-bias updates during RL (0 = frozen)
        reward_workers=2,
        # agentic RL: the tool environment that plays the problems of its kinds as multi-turn
        # episodes ("" = every problem single-turn), and the model turns an episode may take
        env="",
        max_turns=3,
        **PRESETS[algorithm]))
    # GLM-4.5's dynamic temperature: every `every` steps (0 = off), and when the held-out reward
    # plateaus (`plateau_window` > 0: the mean of the last that many evaluations rose less than
    # `plateau_delta` over the ones before; `plateaued`), score the held-out set with `samples`
    # completions per problem at each of `temperatures`, and continue the rollouts at the
    # hottest one within `tolerance` (relative) of the best (`pick_temperature`).
    config.rl.dynamic_temperature = ml_collections.ConfigDict(dict(
        every=0, plateau_window=0, plateau_delta=0.01, temperatures="0.6,0.8,1.0,1.2",
        tolerance=0.01, samples=4))
    # GLM-4.5's two-stage difficulty curriculum: stage 1 trains on the first `pool` training
    # prompts whose pass rate over `samples` completions lies strictly in (low, high); then on
    # those with pass@zero_at = 0 (from zero_at samples) and pass@nonzero_at > 0 (from nonzero_at
    # more), screened with the policy of the switch step. The switch comes at step `switch_step`
    # (0 = no fixed step) or earlier when the stage-1 training reward plateaus (`plateau_window`
    # > 0: its mean over the last that many steps rose less than `plateau_delta` over the steps
    # before). Counts are cached in the workdir (curriculum.jsonl): a resumed run does not
    # sample them again.
    config.rl.curriculum = ml_collections.ConfigDict(dict(
        enabled=False, pool=256, samples=8, low=0.0, high=1.0, switch_step=0, plateau_window=0,
        plateau_delta=0.01, zero_at=8, nonzero_at=64))
    config.eval = ml_collections.ConfigDict(dict(
        every=10, task="builtin", problems=60, max_new_tokens=64, batch_size=64, samples=0))
    return config


def validate_grpo(config) -> None:
    for field in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "micro_batches"):
        config_lib.check_int(config, field, 1)
    config_lib.check_int(config, "seq_len", 2)
    config_lib.check_optimizer(config)
    config_lib.check_mesh(config)
    rl = config.rl
    for field in ("group_size", "groups_per_step", "max_rounds", "max_new_tokens",
                  "rollout_batch_size", "updates_per_batch", "train_problems"):
        config_lib.check_int(config, f"rl.{field}", 1)
    config_lib.check_int(config, "rl.overlong_cache", 0)
    config_lib.check_int(config, "rl.reward_workers", 0)
    config_lib.check_float(config, "rl.temperature", positive=True)
    config_lib.check_float(config, "rl.tis_cap", positive=True)
    config_lib.check_int(config, "rl.max_turns", 1)
    if rl.env and rl.env not in ENVIRONMENTS:
        raise ConfigError(f"config.rl.env: {rl.env!r} is not one of {sorted(ENVIRONMENTS)} "
                          "('' = single-turn)")
    if rl.env and rl.routing_replay:
        raise ConfigError("config.rl.routing_replay: not with config.rl.env (multi-turn "
                          "episodes record no routing)")
    dynamic = rl.dynamic_temperature
    config_lib.check_int(config, "rl.dynamic_temperature.every", 0)
    config_lib.check_int(config, "rl.dynamic_temperature.plateau_window", 0)
    config_lib.check_float(config, "rl.dynamic_temperature.plateau_delta")
    config_lib.check_int(config, "rl.dynamic_temperature.samples", 1)
    if not 0.0 <= dynamic.tolerance < 1.0:
        raise ConfigError(f"config.rl.dynamic_temperature.tolerance: must be in [0, 1), got "
                          f"{dynamic.tolerance}")
    curriculum = rl.curriculum
    for field in ("pool", "samples", "zero_at"):
        config_lib.check_int(config, f"rl.curriculum.{field}", 1)
    config_lib.check_int(config, "rl.curriculum.switch_step", 0)
    config_lib.check_int(config, "rl.curriculum.plateau_window", 0)
    config_lib.check_float(config, "rl.curriculum.plateau_delta")
    config_lib.check_int(config, "rl.curriculum.nonzero_at", curriculum.zero_at + 1)
    if not 0.0 <= curriculum.low < curriculum.high <= 1.0:
        raise ConfigError(f"config.rl.curriculum: needs 0 <= low < high <= 1, got low="
                          f"{curriculum.low}, high={curriculum.high}")
    if dynamic.every or dynamic.plateau_window:
        temperatures(config)  # raises naming a bad entry
        if not config.eval.task:
            raise ConfigError("config.rl.dynamic_temperature: needs held-out problems "
                              "(config.eval.task is empty)")
    if dynamic.plateau_window and not config.eval.every:
        raise ConfigError("config.rl.dynamic_temperature.plateau_window: needs periodic "
                          "held-out evaluations (config.eval.every is 0)")
    for field in ("eps_low", "eps_high", "kl_beta", "bias_rate", "clip_c"):
        config_lib.check_float(config, f"rl.{field}")
    if rl.clip_c and rl.clip_c <= 1:
        raise ConfigError(f"config.rl.clip_c: must be > 1 (or 0 = off), got {rl.clip_c}")
    if rl.overlong_cache > rl.max_new_tokens:
        raise ConfigError(f"config.rl.overlong_cache: {rl.overlong_cache} exceeds "
                          f"rl.max_new_tokens {rl.max_new_tokens}")
    if rl.aggregation != "auto":
        GrpoConfig(aggregation=rl.aggregation)  # raises naming the modes
    rows = rl.group_size * rl.groups_per_step
    if rows % config.micro_batches:
        raise ConfigError(f"config.micro_batches: {config.micro_batches} does not divide the "
                          f"{rows} rows of a step (rl.group_size x rl.groups_per_step)")
    for field in ("every", "samples"):
        config_lib.check_int(config, f"eval.{field}", 0)
    for field in ("problems", "max_new_tokens", "batch_size"):
        config_lib.check_int(config, f"eval.{field}", 1)
    for field in ("rl.task", "eval.task"):
        value = config[field.split(".")[0]].task
        if value not in ("builtin", "") and not Path(value).is_file():
            raise ConfigError(f"config.{field}: {value!r} is not 'builtin' or a file")
    if not config.rl.task:
        raise ConfigError("config.rl.task: empty (use 'builtin' or a JSONL of prompts)")
    if not config.init:
        raise ConfigError("config.init: empty; name the starting policy's workdir (an SFT run)")
    check_init_sft_config(config)
    init = Path(config.init)
    if not config.init_sft_config and not ((init / MODEL_CONFIG_FILE).is_file()
                                           or (init / "config.json").is_file()):
        raise ConfigError(f"config.init: {config.init!r} is neither a training workdir nor a "
                          "Hugging Face directory (and no init_sft_config to create it)")
    if jax.process_count() > 1:
        raise ConfigError("the GRPO loop runs in one process (its local devices); got "
                          f"{jax.process_count()} processes")


def temperatures(config) -> tuple[float, ...]:
    """config.rl.dynamic_temperature.temperatures as floats > 0."""
    text = config.rl.dynamic_temperature.temperatures
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or not all(0 < t < float("inf") for t in values):
        raise ConfigError(f"config.rl.dynamic_temperature.temperatures: {text!r} is not a "
                          "comma-separated list of temperatures > 0")
    return values


def _kinds(config) -> tuple[str, ...]:
    return tasks.parse_kinds(config.rl.kinds, "config.rl.kinds")


def train_problems(config) -> list[tasks.Problem]:
    if config.rl.task == "builtin":
        return tasks.problems("train", config.rl.train_problems, kinds=_kinds(config),
                              seed=config.seed)
    return tasks.load_problems(config.rl.task)


def heldout_problems(config) -> list[tasks.Problem]:
    if config.eval.task == "builtin":
        kinds = _kinds(config) if config.rl.task == "builtin" else tasks.KINDS
        return tasks.problems("heldout", config.eval.problems, kinds=kinds, seed=config.seed)
    if config.eval.task:
        return tasks.load_problems(config.eval.task)[:config.eval.problems]
    return []


def grpo_config(config, problems) -> GrpoConfig:
    aggregation = config.rl.aggregation
    if aggregation == "auto":  # the report: token-level loss for code, sequence-level otherwise
        code = problems and all(p.reward == "code" for p in problems)
        aggregation = "token-mean" if code else "seq-mean-token-mean"
    return GrpoConfig(eps_low=config.rl.eps_low, eps_high=config.rl.eps_high,
                      clip_c=config.rl.clip_c or None, aggregation=aggregation,
                      kl_beta=config.rl.kl_beta, bias_rate=config.rl.bias_rate,
                      grad_clip=config.grad_clip)


class PromptStream:
    """Prompts in a seeded order, reshuffled every epoch; `position` (prompts drawn so far) is
    all a checkpoint needs to continue it exactly."""

    def __init__(self, problems, seed: int, position: int = 0):
        if not problems:
            raise ConfigError("config.rl.task: no training prompts")
        self.problems, self.seed, self.position = list(problems), seed, position
        self._epoch, self._order = -1, None

    def draw(self, n: int) -> list[tasks.Problem]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.position, len(self.problems))
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(
                    len(self.problems))
            out.append(self.problems[self._order[index]])
            self.position += 1
        return out


def starting_policy(config, mesh):
    """-> (model, tokenizer) from config.init (a Hugging Face directory or a training workdir),
    running config.init_sft_config into the workdir first when it holds no checkpoint."""
    init = Path(config.init)
    if (init / "config.json").is_file():
        tokenizer = load_tokenizer(init / "tokenizer.json")
        check_chat_tokens(tokenizer, init / "tokenizer.json")
        return load_hf(init, mesh=mesh), tokenizer
    if not has_checkpoint(init):
        if not config.init_sft_config:
            raise ConfigError(f"config.init: {init} holds no checkpoint")
        run_sft_config(init, config.init_sft_config)
    model, tokenizer = load_workdir(init, mesh=mesh)
    check_chat_tokens(tokenizer, init / "tokenizer.json")
    return model, tokenizer


def _check_lengths(config, tokenizer, problems) -> None:
    longest = max(len(prompt_ids(tokenizer, p, thinking=config.rl.thinking)) for p in problems)
    needed = longest + config.rl.max_new_tokens - 1
    if needed > config.seq_len:
        raise ConfigError(f"config.seq_len: {config.seq_len} is shorter than the longest prompt "
                          f"({longest} tokens) + rl.max_new_tokens - 1 = {needed}")


def _padded_batch(groups: Groups, advantages, config, temperature) -> dict[str, np.ndarray]:
    """The training batch at its fixed shape: `groups_per_step * group_size` rows, the rows of
    missing groups (dynamic sampling came up short) empty, so the step never recompiles."""
    rows = config.rl.group_size * config.rl.groups_per_step
    missing = rows - len(groups.prompts)
    pad_prompt = groups.prompts[0][:1] if groups.prompts else (0,)
    routing = None
    if groups.routing is not None:
        routing = list(groups.routing) + [groups.routing[0][:0]] * missing
    masks = None
    if groups.completion_masks is not None:
        masks = list(groups.completion_masks) + [()] * missing
    return rollout_batch(
        list(groups.prompts) + [pad_prompt] * missing,
        list(groups.completions) + [()] * missing,
        list(groups.logprobs) + [()] * missing,
        np.concatenate([np.asarray(advantages, np.float32), np.zeros(missing, np.float32)]),
        seq_len=config.seq_len, micro_batches=config.micro_batches,
        temperature=temperature, routing=routing, completion_masks=masks)


def _logp_mismatch(batch, rollout_logp) -> dict[str, float]:
    """Mean |old_logp - rollout_logp| over the completion tokens: how far the trainer's
    recomputed log-probs are from the sampler's (FP8 weights, routing flips, numerics)."""
    mask = batch["mask"]
    tokens = max(float(mask.sum()), 1.0)
    return dict(rollout_logp_mismatch=float(
        (np.abs(batch["old_logp"] - rollout_logp) * mask).sum() / tokens))


def _importance_weights(batch, rollout_logp, cap: float) -> dict[str, float]:
    """Puts the truncated importance weights min(exp(old_logp - rollout_logp), cap) into
    `batch["is_weight"]`; -> their metrics over the completion tokens."""
    mask = batch["mask"]
    diff = (batch["old_logp"] - rollout_logp) * mask
    raw = np.exp(np.clip(diff, -20.0, 20.0))
    batch["is_weight"] = (np.minimum(raw, cap) * mask).astype(np.float32)
    tokens = max(float(mask.sum()), 1.0)
    return dict(is_weight_mean=float(batch["is_weight"].sum() / tokens),
                is_capped_frac=float(((raw > cap) * mask).sum() / tokens))


def rollout_metrics(rounds: list[Groups], kept: Groups) -> dict[str, float]:
    """Over every completion sampled this step (all rounds), and the kept groups' rewards."""
    scores = np.concatenate([r.scores for r in rounds])
    lengths = [len(c) for r in rounds for c in r.completions]
    out = dict(reward_mean=float(scores.mean()), reward_std=float(scores.std()),
               response_len=float(np.mean(lengths)),
               truncated_frac=float(np.mean(np.concatenate([r.truncated for r in rounds]))),
               generated_tokens=float(sum(sum(r.model_tokens()) for r in rounds)))
    if len(kept):
        out["kept_reward_mean"] = float(kept.rewards.mean())
    return out


def curriculum_stage(stage: int, train_set, sample, cache: PassCountCache, config, *,
                     policy_step: int) -> tuple[list[tasks.Problem], dict[str, float]]:
    """-> (the stage's prompts, the row to log). `sample(problems, n, seed)` -> rewards of n
    completions per problem. Stage 1 keeps the moderate prompts of the pool, stage 2 the hard
    ones (`select_hard_prompts`); a stage that selects nothing keeps the whole pool (stage 1)
    or the stage-1 prompts (stage 2), and the row says so."""
    cur = config.rl.curriculum
    screened = {p.key: p for p in train_set[:cur.pool]}
    keys = list(screened)

    def counts(keys, n):
        return count_correct(keys, lambda part, i: sample(
            [screened[k] for k in part], n, (config.seed * 1_000_003 + policy_step) * 64 + i),
            n=n, cache=cache, policy_step=policy_step)

    if stage == 1:
        correct = counts(keys, cur.samples)
        chosen = select_moderate_prompts(correct, cur.samples, low=cur.low, high=cur.high)
        rate = float(np.mean([correct[k] / cur.samples for k in chosen])) if chosen else 0.0
    else:
        first = counts(keys, cur.zero_at)
        unsolved = [k for k in keys if first[k] == 0]
        more = counts(unsolved, cur.nonzero_at) if unsolved else {}
        rates = {k: {cur.zero_at: pass_at_k(cur.zero_at, first[k], cur.zero_at),
                     cur.nonzero_at: (pass_at_k(cur.nonzero_at, more[k], cur.nonzero_at)
                                      if k in more else 1.0)} for k in keys}
        chosen = select_hard_prompts(rates, zero_at=cur.zero_at, nonzero_at=cur.nonzero_at)
        rate = float(np.mean([more[k] / cur.nonzero_at for k in chosen])) if chosen else 0.0
    row = {"curriculum_stage": float(stage), "stage_prompts": float(len(chosen)),
           "stage_pass_rate": rate, "screened_prompts": float(len(keys))}
    return [screened[k] for k in chosen], row


def _copy_into(workdir: Path, init: Path) -> None:
    """The GRPO workdir loads alone (eval, generate, chat, a later GRPO run): the policy's
    tokenizer beside its checkpoints (the model config is written by `save_model_config`)."""
    if not (workdir / "tokenizer.json").exists():
        shutil.copyfile(init / "tokenizer.json", workdir / "tokenizer.json")


def grpo(config) -> list[dict]:
    """Runs until `config.steps`; resumes from the workdir; returns the rows logged by this run
    (per-step rows and eval rows)."""
    validate_grpo(config)
    workdir = Path(config.workdir)
    train_set, heldout = train_problems(config), heldout_problems(config)
    mesh = training_mesh(config)
    model, tokenizer = starting_policy(config, mesh)
    _check_lengths(config, tokenizer, train_set + heldout)
    workdir.mkdir(parents=True, exist_ok=True)
    _copy_into(workdir, Path(config.init))
    save_model_config(workdir, model.config)
    optimizer, _ = build_optimizer(config)
    graphdef, state = TrainState.create(model, optimizer)
    del model
    state = _committed(state, mesh)
    step_config = grpo_config(config, train_set)
    ref_params = jax.tree.map(lambda x: x.copy(), state.params) if step_config.kl_beta else None
    train_step = make_grpo_step(graphdef, optimizer, step_config,
                                jax.tree.map(lambda x: x.sharding, state))
    policy_logp = make_policy_logp(graphdef)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    start, position, temperature, stage = 0, 0, float(config.rl.temperature), 1
    # the plateau triggers' histories: stage-1 training rewards, held-out rewards since the last
    # temperature choice; and the step of the stage switch (its policy screened stage 2)
    history = {"train_rewards": [], "eval_rewards": [], "switched_at": 0}
    restored = checkpointer.restore_latest(lambda step: checkpointer.restore(step, state))
    if restored is not None:
        start, (state, data_state) = restored
        position = int(data_state["position"])
        temperature = float(data_state.get("temperature", temperature))
        stage = int(data_state.get("stage", stage))
        history.update({k: data_state[k] for k in history if k in data_state})
        logging.warning("resumed GRPO from step %d", start)
    logger = MetricsLogger(workdir, start_step=start, total_steps=config.steps)
    rl = config.rl
    overlong = Overlong(rl.max_new_tokens, rl.overlong_cache) if rl.overlong_cache else None
    logged, curve = [], _curve_rows(workdir, start)
    pool = RewardPool(workers=rl.reward_workers)
    unplayed = sorted({p.kind for p in train_set if environment_for(p.kind) not in ("", rl.env)})
    if unplayed:
        logging.warning("config.rl.env=%r: the %s problems are rolled out single-turn, where a "
                        "tool call scores 0", rl.env, ",".join(unplayed))
    agentic = bool(rl.env) and any(p.kind in ENVIRONMENTS[rl.env].kinds for p in train_set)
    episode_stats = EpisodeStats()  # the current step's episodes

    def policy():
        return nnx.merge(graphdef, state.params, state.buffers)  # the live arrays, no copy

    def sampler():
        """The rollouts' model: the policy, or (fp8_rollouts) it re-quantised to FP8 now."""
        return quantize_model(policy()) if rl.fp8_rollouts else policy()

    # The held-out scores (greedy, sampled, per candidate temperature): same problems and budget.
    held_out = functools.partial(
        evaluate_tasks, tokenizer=tokenizer, problems=heldout, pool=pool, thinking=rl.thinking,
        max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size,
        seed=config.seed, max_turns=rl.max_turns)

    def run_eval(step):
        tick = time.perf_counter()
        with jax.set_mesh(mesh):
            model = policy()
            row = held_out(model, temperature=0.0)
            if config.eval.samples:
                sampled = held_out(model, n=config.eval.samples, temperature=temperature,
                                   prefix="eval_sampled_")
                row["eval_reward_sampled"] = sampled.pop("eval_sampled_accuracy")
                row.update(sampled)
        row["eval_reward"] = row.pop("eval_accuracy")
        row["eval_seconds"] = time.perf_counter() - tick
        history["eval_rewards"].append(row["eval_reward"])
        logger.log(step, row)
        logged.append({"step": step, **row})
        curve.append({"step": step, **row})
        write_reward_curve(curve, workdir / "reward_curve.png")

    def tune_temperature(step) -> dict[str, float]:
        """Scores the held-out set at each candidate temperature; -> the row to log, with the
        picked `rollout_temperature`."""
        tick, table = time.perf_counter(), {}
        dynamic = rl.dynamic_temperature
        with jax.set_mesh(mesh):
            for t in temperatures(config):
                scores = held_out(policy(), n=dynamic.samples, temperature=t,
                                  seed=config.seed * 1_000_003 + step, prefix="")
                table[t] = scores["accuracy"]
        picked = pick_temperature(table, tolerance=dynamic.tolerance)
        row = {f"temperature_score_T{t:g}": s for t, s in table.items()}
        row.update(rollout_temperature=picked, temperature_seconds=time.perf_counter() - tick)
        logging.warning("step %d: held-out reward by temperature %s -> rollouts at %g",
                        step, {f"{t:g}": round(s, 4) for t, s in table.items()}, picked)
        return row

    def sample_rewards(problems, n, seed):
        with jax.set_mesh(mesh):
            return rollout_with_environment(
                sampler(), tokenizer, problems, pool, env=rl.env, max_turns=rl.max_turns,
                group_size=n, sampling=SamplingConfig(temperature=temperature),
                thinking=rl.thinking, max_new_tokens=rl.max_new_tokens,
                batch_size=rl.rollout_batch_size, seed=seed).scores

    stage_set, stage_fallback = train_set, train_set
    cache = PassCountCache(workdir / "curriculum.jsonl")

    def enter_stage(number, step):
        """Screens for stage `number` (stage 1 with the starting policy, stage 2 with the
        policy of the switch step); -> its prompts."""
        tick = time.perf_counter()
        chosen, row = curriculum_stage(number, train_set, sample_rewards, cache, config,
                                       policy_step=0 if number == 1 else history["switched_at"])
        row["screen_seconds"] = time.perf_counter() - tick
        if not chosen:
            logging.warning("curriculum stage %d selected no prompt: keeping the previous set",
                            number)
        if step >= start:  # not a resumed run rebuilding an earlier stage
            logger.log(step, row)
            logged.append({"step": step, **row})
        return chosen

    def rollout(problems, round_index, step):
        with jax.set_mesh(mesh):
            return rollout_with_environment(
                sampler(), tokenizer, problems, pool, env=rl.env, max_turns=rl.max_turns,
                stats=episode_stats, group_size=rl.group_size,
                sampling=SamplingConfig(temperature=temperature), thinking=rl.thinking,
                max_new_tokens=rl.max_new_tokens, batch_size=rl.rollout_batch_size,
                seed=(config.seed * 1_000_003 + step) * 64 + round_index,
                overlong=overlong, record_routing=rl.routing_replay)

    try:
        if heldout and start == 0:
            run_eval(0)
        if rl.curriculum.enabled:
            stage_fallback = enter_stage(1, 0 if start == 0 else -1) or train_set[:rl.curriculum.pool]
            stage_set = stage_fallback
            if stage == 2:
                stage_set = enter_stage(2, -1) or stage_fallback
        stream = PromptStream(stage_set, config.seed + stage - 1, position)
        for step in range(start, config.steps):
            if rl.curriculum.enabled and stage == 1 and _switch_now(step, history, config):
                stage, history["switched_at"] = 2, step
                logging.warning("step %d: curriculum stage 2 (%s)", step,
                                "fixed step" if step == rl.curriculum.switch_step
                                else "stage-1 reward plateaued")
                stream = PromptStream(enter_stage(2, step) or stage_fallback, config.seed + 1, 0)
            tick = time.perf_counter()
            episode_stats = EpisodeStats()
            groups, counts, rounds = collect_groups(
                stream.draw, lambda problems, r: rollout(problems, r, step),
                groups_per_step=rl.groups_per_step, max_rounds=rl.max_rounds,
                dynamic=rl.dynamic_sampling)
            rollout_seconds = time.perf_counter() - tick
            row = {**counts, **rollout_metrics(rounds, groups), "rollout_seconds": rollout_seconds,
                   "rollout_temperature": temperature}
            if rl.curriculum.enabled:
                row["curriculum_stage"] = float(stage)
                if stage == 1:
                    history["train_rewards"].append(row["reward_mean"])
            if agentic:
                row.update(episode_stats.as_metrics())
            row["rollout_tokens_per_second"] = row["generated_tokens"] / rollout_seconds
            tick = time.perf_counter()
            if len(groups):
                advantages = group_advantages(groups.rewards, rl.group_size,
                                              scale_by_std=rl.scale_by_std)
                batch = _padded_batch(groups, advantages, config, temperature)
                with jax.set_mesh(mesh):
                    if rl.recompute_old_logp or rl.fp8_rollouts:
                        rollout_logp = batch["old_logp"]
                        batch["old_logp"] = np.asarray(policy_logp(state, batch))
                        row.update(_logp_mismatch(batch, rollout_logp))
                        if rl.fp8_rollouts:
                            row.update(_importance_weights(batch, rollout_logp, rl.tis_cap))
                    for update in range(rl.updates_per_batch):
                        rng = jax.random.fold_in(jax.random.key(config.seed),
                                                 step * rl.updates_per_batch + update)
                        state, metrics = train_step(state, batch, rng, ref_params)
                row.update({k: float(v) for k, v in jax.device_get(metrics).items()})
            row["no_signal"] = float(not len(groups))  # no informative group: no update
            row["train_seconds"] = time.perf_counter() - tick
            if "train_tokens" in row:
                row["train_tokens_per_second"] = (row["train_tokens"] * rl.updates_per_batch
                                                  / row["train_seconds"])
            done = step + 1
            logger.advance()
            if done % config.log_every == 0 or done == config.steps:
                logger.log(done, row)
                logged.append({"step": done, **row})
                curve.append({"step": done, "reward_mean": row["reward_mean"]})
            if heldout and config.eval.every and (done % config.eval.every == 0
                                                  or done == config.steps):
                run_eval(done)
            if _tune_now(done, history, config):
                tuned = tune_temperature(done)
                temperature = tuned["rollout_temperature"]
                history["eval_rewards"] = []  # the next plateau is measured from here
                logger.log(done, tuned)
                logged.append({"step": done, **tuned})
            if done % config.checkpoint_every == 0 or done == config.steps:
                checkpointer.save(done, state, {"position": stream.position,
                                                "temperature": temperature, "stage": stage,
                                                **history})
        checkpointer.wait()
    finally:
        checkpointer.close()
        logger.close()
        pool.close()
    return logged


def _switch_now(step: int, history: dict, config) -> bool:
    """The curriculum's stage-1 -> stage-2 switch: at `switch_step`, or on a reward plateau."""
    cur = config.rl.curriculum
    if step == cur.switch_step > 0:
        return True
    return bool(cur.plateau_window) and plateaued(history["train_rewards"],
                                                  window=cur.plateau_window,
                                                  min_delta=cur.plateau_delta)


def _tune_now(done: int, history: dict, config) -> bool:
    """The dynamic temperature's trigger: every `every` steps, or on a held-out plateau."""
    dynamic = config.rl.dynamic_temperature
    if dynamic.every and done % dynamic.every == 0:
        return True
    return bool(dynamic.plateau_window) and plateaued(history["eval_rewards"],
                                                      window=dynamic.plateau_window,
                                                      min_delta=dynamic.plateau_delta)


def _committed(state, mesh):
    """Every leaf placed on the mesh (leaves made outside it, like the step counter,
    replicated): the jitted step then sees the same shardings on every call."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else jax.device_put(x, replicated), state)


def _curve_rows(workdir: Path, start: int) -> list[dict]:
    """The reward-curve points a resumed run already logged (metrics.jsonl up to `start`)."""
    if not start:
        return []
    return [r for r in read_records(workdir / "metrics.jsonl", start)
            if "eval_reward" in r or "reward_mean" in r]
