"""`pretrain(config)`: the pre-training loop, and the loop machinery SFT shares (`train`).
Builds tokenizer, model, optimizer and data from an ml_collections config, resumes from the
latest checkpoint in the workdir if there is one, runs the jitted step, logs, evaluates and
checkpoints. A stopped run restarted with the same command continues exactly where it stopped.
A workdir holds its model config, tokenizer and checkpoints: `load_workdir` needs nothing else."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax.sharding import NamedSharding, PartitionSpec as P

from glm_jax import data as data_lib
from glm_jax import sharding
from glm_jax.config import ModelConfig
from glm_jax.model import GlmMoeModel
from glm_jax.errors import InputError
from glm_jax.optim import batch_size_schedule, muon, warmup_cosine
from glm_jax.train.checkpoint import Checkpointer
from glm_jax.train.config import validate_pretrain
from glm_jax.train.flops import train_flops_per_token
from glm_jax.train.metrics import MetricsLogger
from glm_jax.train.step import StepConfig, TrainState, make_train_step


def _none_if_negative(value):
    return None if value is None or value < 0 else value


def step_config(config) -> StepConfig:
    c = config.step
    return StepConfig(
        mtp_weight=c.mtp_weight, mtp_weight_after=c.mtp_weight_after,
        mtp_weight_switch_step=_none_if_negative(c.mtp_weight_switch_step),
        aux_weight=c.aux_weight, bias_rate=c.bias_rate,
        bias_stop_step=_none_if_negative(c.bias_stop_step), spike_factor=c.spike_factor,
        spike_warmup_steps=c.spike_warmup_steps, loss_chunk=c.loss_chunk,
        grad_clip=config.grad_clip)


def build_optimizer(config):
    schedule = warmup_cosine(peak=config.peak_learning_rate, floor=config.floor_learning_rate,
                             warmup_steps=config.warmup_steps, total_steps=config.schedule_steps)
    momentum_dtype = jnp.dtype(config.momentum_dtype)
    if config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay,
                                mu_dtype=momentum_dtype)
    else:
        optimizer = muon(schedule, weight_decay=config.weight_decay,
                         head_with_adam=config.head_with_adam,
                         ns_dtype=jnp.dtype(config.muon_ns_dtype), momentum_dtype=momentum_dtype)
    return optimizer, schedule


def model_config(config, vocab_size: int) -> ModelConfig:
    overrides = dict(config.model.overrides)
    return ModelConfig.preset(config.model.preset, **{"vocab_size": vocab_size, **overrides})


def training_mesh(config):
    """The mesh over `config.num_devices` devices (0 = all) with `config.mesh` axis sizes."""
    devices = jax.devices()[:config.num_devices] if config.num_devices else jax.devices()
    return sharding.make_mesh(dict(config.mesh), devices=devices)


def init_state(config, model_cfg: ModelConfig, optimizer, mesh):
    """Model parameters created directly in their shardings (one jitted initialisation), then
    the optimizer state beside them (eager `zeros_like` keeps each parameter's sharding)."""
    model = sharding.create_sharded(
        lambda: GlmMoeModel(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
    return TrainState.create(model, optimizer)


def on_mesh(state, mesh):
    """Every leaf placed on the mesh (scalars made outside it, like the step counter,
    replicated): the jitted step then sees the same shardings on every call and compiles once."""
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else jax.device_put(x, replicated), state)


def global_batch(batch: dict[str, np.ndarray], micro_batches: int, mesh) -> dict[str, jax.Array]:
    """This process's rows [B_local, S] -> global arrays [micro_batches, B / micro_batches, S]
    sharded over the data-parallel axes."""
    spec = NamedSharding(mesh, P(None, sharding.BATCH_AXES, None))
    out = {}
    for name, local in batch.items():
        local = np.reshape(local, (micro_batches, -1) + local.shape[1:])
        shape = (micro_batches, local.shape[1] * jax.process_count()) + local.shape[2:]
        out[name] = jax.make_array_from_process_local_data(spec, local, shape)
    return out


def accumulation_schedule(config):
    """step -> micro-batches accumulated into that step. Constant `config.micro_batches`, or,
    with a batch-size warm-up (`config.batch_warmup.start_batch` > 0), ramping from
    start_batch to batch_size sequences in stages over `ramp_tokens` tokens."""
    warmup = config.batch_warmup
    if not warmup.start_batch:
        return lambda step: config.micro_batches
    micro = config.batch_size // config.micro_batches
    batch_at = batch_size_schedule(
        start_tokens=warmup.start_batch * config.seq_len,
        end_tokens=config.batch_size * config.seq_len, ramp_tokens=warmup.ramp_tokens,
        seq_len=config.seq_len, micro_batch=micro, stages=warmup.stages)
    counts, tokens = [], 0

    def at(step: int) -> int:
        nonlocal tokens
        while len(counts) <= step:  # tokens seen so far follow from the steps before
            counts.append(batch_at(tokens).accumulation_steps)
            tokens += counts[-1] * micro * config.seq_len
        return counts[step]

    return at


MODEL_CONFIG_FILE = "model_config.json"


def save_model_config(workdir: Path, model_cfg: ModelConfig) -> None:
    """Writes the run's ModelConfig beside its checkpoints: a workdir describes its own model,
    so loading it needs no training config."""
    tmp = workdir / f".{MODEL_CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    tmp.replace(workdir / MODEL_CONFIG_FILE)


def read_model_config(workdir: Path) -> ModelConfig:
    path = Path(workdir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{workdir}: not a glm-jax training workdir (no {MODEL_CONFIG_FILE})")
    try:
        return ModelConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{path}: unreadable ({e})") from e


def train(config, workdir: Path, graphdef, state: TrainState, train_step, pipeline, mesh,
          model_cfg: ModelConfig, *, evaluate=None) -> list[dict]:
    """The loop shared by pre-training and SFT: resumes state and data position from the newest
    readable checkpoint, runs `train_step` on micro-batches from `pipeline` (this process's
    rows), logs every `log_every` steps, calls `evaluate(model) -> {eval_*: float}` at the start
    and every `config.eval.every` steps (and at the end), checkpoints every `checkpoint_every`.
    Returns the metrics logged by this run (one dict per logged step)."""
    processes = jax.process_count()
    micro_rows = config.batch_size // config.micro_batches // processes
    accumulation = accumulation_schedule(config)
    batches = iter(pipeline)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    state = on_mesh(state, mesh)
    start = 0
    restored = checkpointer.restore_latest(lambda step: checkpointer.restore(step, state))
    if restored is not None:
        start, (state, data_state) = restored
        batches.set_state(data_state)
    logger = MetricsLogger(workdir, start_step=start, total_steps=config.steps,
                           enabled=jax.process_index() == 0)
    if restored is not None:
        logger.note(f"resumed from step {start} ({checkpointer.directory})")
    flops = train_flops_per_token(model_cfg, config.seq_len)
    peak = config.peak_flops_per_device * jax.device_count()
    eval_every = config.eval.every if evaluate is not None else 0
    logged = []

    def run_eval(step):
        with jax.set_mesh(mesh):
            results = evaluate(nnx.merge(graphdef, state.params, state.buffers))
        logger.log(step, results)
        logged.append({"step": step, **results})

    if evaluate is not None and start == 0:
        run_eval(0)
    tick, tokens = time.perf_counter(), 0.0
    for step in range(start, config.steps):
        micro = [next(batches) for _ in range(accumulation(step))]
        batch = {k: np.concatenate([m[k] for m in micro]) for k in micro[0]}
        began = time.perf_counter()
        with jax.set_mesh(mesh):
            state, metrics = train_step(state, global_batch(batch, len(micro), mesh))
        if step == start:  # its time is the compilation's: said apart, not in the bar's rate
            jax.block_until_ready(metrics)
            logger.note(f"compiled the train step in {time.perf_counter() - began:.1f} s")
        done = step + 1
        tokens += len(micro) * micro_rows * processes * config.seq_len
        logger.advance()
        if done % config.log_every == 0 or done == config.steps:
            metrics = jax.device_get(metrics)
            elapsed = time.perf_counter() - tick
            metrics["tokens_per_second"] = tokens / elapsed
            if peak:
                metrics["mfu"] = metrics["tokens_per_second"] * flops / peak
            logger.log(done, metrics)
            logged.append({"step": done, **{k: float(np.asarray(v)) for k, v in metrics.items()
                                            if np.ndim(v) == 0}})
            tick, tokens = time.perf_counter(), 0.0
        if eval_every and (done % eval_every == 0 or done == config.steps):
            run_eval(done)
            tick = time.perf_counter()  # evaluation time is not training time
        if done % config.checkpoint_every == 0 or done == config.steps:
            checkpointer.save(done, state, batches.get_state())
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    return logged


def pretrain(config) -> list[dict]:
    """Runs until `config.steps`; returns the metrics logged by this run."""
    workdir = Path(config.workdir)
    validate_pretrain(config, workdir_has_tokenizer=(workdir / "tokenizer.json").exists())
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = data_lib.tokenizer_for(config, workdir)
    model_cfg = model_config(config, tokenizer.get_vocab_size())
    save_model_config(workdir, model_cfg)
    optimizer, schedule = build_optimizer(config)
    mesh = training_mesh(config)
    graphdef, state = init_state(config, model_cfg, optimizer, mesh)
    train_step = make_train_step(graphdef, optimizer, step_config(config), schedule)
    processes = jax.process_count()
    pipeline = data_lib.build_pipeline(  # yields this process's rows of one micro-batch
        config.data, tokenizer=tokenizer, seq_len=config.seq_len,
        batch_size=config.batch_size // config.micro_batches // processes,
        seed=config.seed, shard_index=jax.process_index(), shard_count=processes,
        cache_dir=workdir / "data")
    evaluate = heldout_evaluation(config, tokenizer, workdir / "data" / "stdlib")
    return train(config, workdir, graphdef, state, train_step, pipeline, mesh, model_cfg,
                 evaluate=evaluate)


def heldout_evaluation(config, tokenizer, corpus_dir):
    """-> evaluate(model) -> {"eval_bits_per_byte"} on `config.eval.heldout_chars` of the
    stdlib corpus's held-out modules, or None when that is 0."""
    from glm_jax.rl.evaluate import bits_per_byte

    if not config.eval.heldout_chars:
        return None
    text = data_lib.heldout_code(corpus_dir, config.eval.heldout_chars)
    return lambda model: {"eval_bits_per_byte": bits_per_byte(model, tokenizer, [text],
                                                              seq_len=config.seq_len)}


def load_workdir(workdir, *, mesh=None):
    """-> (model, tokenizer) from a training workdir (pre-training or SFT): its model config,
    tokenizer and the newest readable checkpoint's weights and balance biases, restored
    straight into their shardings (no optimizer state is built). `mesh`: default one device."""
    workdir = Path(workdir)
    model_cfg = read_model_config(workdir)
    tokenizer_path = workdir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise InputError(f"{workdir}: not a training workdir (no {tokenizer_path.name})")
    checkpointer = Checkpointer(workdir / "checkpoints", async_save=False)
    if checkpointer.latest_step() is None:
        raise InputError(f"{workdir / 'checkpoints'}: no checkpoint to load")
    tokenizer = data_lib.load_tokenizer(tokenizer_path)
    abstract = nnx.eval_shape(lambda: GlmMoeModel(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(abstract, nnx.Param, ...)
    mesh = mesh or sharding.make_mesh({}, devices=jax.devices()[:1])

    def placed(tree):
        return jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
            tree, sharding.state_shardings(tree, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))

    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    like = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=placed(params),
                      buffers=placed(buffers), opt_state=None, loss_ema=scalar)
    restored = checkpointer.restore_latest(lambda step: checkpointer.restore_weights(step, like))
    checkpointer.close()
    if restored is None:
        raise InputError(f"{workdir / 'checkpoints'}: no readable checkpoint")
    _, state = restored
    return nnx.merge(graphdef, state.params, state.buffers), tokenizer
