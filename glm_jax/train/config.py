"""Defaults shared by every pre-training config (configs/pretrain_*.py override them), and the
check that runs before any expensive work: a bad value fails in a second, naming its field,
instead of after the corpus, the tokenizer and a compiled step."""

from __future__ import annotations

import math

import jax
import ml_collections

from glm_jax.config import ModelConfig
from glm_jax.data import default_data_config
from glm_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "workdir/pretrain"
    config.seed = 0
    config.mesh = ml_collections.ConfigDict()  # axis sizes, e.g. {"expert": 4}; data takes the rest
    config.num_devices = 0  # devices to train on; 0 = all
    config.model = ml_collections.ConfigDict(dict(preset="tiny", overrides={}))
    config.steps = 100  # stop after this many steps (a later run with more steps resumes)
    config.schedule_steps = 100  # the learning-rate schedule's horizon
    config.warmup_steps = 10
    config.peak_learning_rate = 2.5e-4  # SPEC.md §3
    config.floor_learning_rate = 2.5e-5
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    # "muon" (GLM-4.5's: Muon on the matrices, AdamW on the rest) or "adamw" (AdamW on every
    # parameter, b2 0.95: the usual choice for RL and fine-tuning from an AdamW checkpoint).
    config.optimizer = "muon"
    config.head_with_adam = False
    # Muon's Newton-Schulz iterations in "bfloat16" (Moonlight's choice: half the optimizer's
    # matmul bytes; the momentum and the update stay float32) or "float32". bfloat16 measured
    # as good: the README demo's held-out bits per byte 1.945 / 1.950 (two seeds) against
    # 1.954 / 1.953 in float32, at the same CPU speed (experiments/benchmarks/RESULTS.md).
    config.muon_ns_dtype = "bfloat16"
    # The optimizer's momentum (Muon's, and AdamW's first moment) stored in "float32" or
    # "bfloat16" (DeepSeek-V3 keeps its AdamW moments in bfloat16): half the momentum's bytes.
    config.momentum_dtype = "float32"
    config.seq_len = 4096
    config.batch_size = 8  # sequences per step, global
    config.micro_batches = 1  # gradient accumulation: batch_size / micro_batches per pass
    # Batch-size warm-up (SPEC.md §3: 16M -> 64M tokens over 500B): start_batch sequences (0 =
    # off) ramping to batch_size in `stages` steps over ramp_tokens, by accumulating fewer
    # micro-batches early on.
    config.batch_warmup = ml_collections.ConfigDict(dict(start_batch=0, ramp_tokens=0, stages=4))
    config.step = ml_collections.ConfigDict(dict(
        mtp_weight=0.3, mtp_weight_after=0.1, mtp_weight_switch_step=-1, aux_weight=1e-4,
        bias_rate=1e-3, bias_stop_step=-1, spike_factor=3.0, spike_warmup_steps=20,
        loss_chunk=8192))  # vocabulary entries per chunk of the cross-entropy; 0 = full logits
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.tokenizer_path = ""  # the model's tokenizer.json
    # With no tokenizer_path: train a byte-level BPE of tokenizer_vocab_size on the corpus. Off
    # by default, so a real model never silently gets a toy tokenizer.
    config.train_tokenizer = False
    config.tokenizer_vocab_size = 4096
    config.peak_flops_per_device = 0.0  # for MFU; 0 leaves MFU out (e.g. on CPU)
    config.data = default_data_config()
    # Held-out bits per byte (`eval_bits_per_byte`) on `heldout_chars` characters of the stdlib
    # corpus's held-out modules (0 = off), at the start, every `every` steps (0: start only)
    # and at the end.
    config.eval = ml_collections.ConfigDict(dict(heldout_chars=0, every=0))
    return config


OPTIMIZER_DTYPES = ("float32", "bfloat16")  # muon_ns_dtype, momentum_dtype
OPTIMIZERS = ("muon", "adamw")


def _fail(field: str, message: str):
    raise ConfigError(f"config.{field}: {message}")


def check_int(config, field: str, minimum: int) -> int:
    value = config
    for part in field.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, f"must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(config, field: str, minimum: float = 0.0, *, positive: bool = False) -> float:
    value = config
    for part in field.split("."):
        value = value[part]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < minimum or (positive and value <= 0)):
        bound = "> 0" if positive else f">= {minimum}"
        _fail(field, f"must be a finite number {bound}, got {value!r}")
    return float(value)


def check_mesh(config) -> None:
    from glm_jax.sharding import AXES

    unknown = set(config.mesh) - set(AXES)
    if unknown:
        _fail("mesh", f"unknown axes {sorted(unknown)}; the axes are {AXES}")
    for axis in config.mesh:
        check_int(config, f"mesh.{axis}", 1)
    devices = config.num_devices or jax.device_count()
    fixed = math.prod(config.mesh.values())
    if devices % fixed:
        _fail("mesh", f"axis sizes {dict(config.mesh)} (product {fixed}) do not divide the "
                      f"{devices} devices")


def check_model(config, vocab_size: int = 0) -> ModelConfig:
    """The ModelConfig `config.model` describes (vocab_size from the tokenizer when known)."""
    overrides = dict(config.model.overrides)
    if vocab_size:
        overrides = {"vocab_size": vocab_size, **overrides}
    try:
        return ModelConfig.preset(config.model.preset, **overrides)
    except TypeError as e:  # an override that is no ModelConfig field
        _fail("model.overrides", str(e))
    except ConfigError as e:
        _fail("model", str(e))


def check_step(config, model: ModelConfig) -> None:
    for field in ("step.mtp_weight", "step.mtp_weight_after", "step.aux_weight",
                  "step.bias_rate", "step.spike_factor"):
        check_float(config, field)
    check_int(config, "step.loss_chunk", 0)
    if not model.num_nextn_predict_layers and (config.step.mtp_weight or (
            config.step.mtp_weight_switch_step >= 0 and config.step.mtp_weight_after)):
        _fail("step.mtp_weight", f"is {config.step.mtp_weight} but the model has no MTP layer "
              "(num_nextn_predict_layers == 0): set step.mtp_weight=0 and step.mtp_weight_after=0")


def check_optimizer(config) -> None:
    check_int(config, "schedule_steps", 2)
    warmup = check_int(config, "warmup_steps", 1)
    if warmup >= config.schedule_steps:
        _fail("warmup_steps", f"{warmup} must be < schedule_steps {config.schedule_steps}")
    peak = check_float(config, "peak_learning_rate", positive=True)
    if check_float(config, "floor_learning_rate") > peak:
        _fail("floor_learning_rate", f"{config.floor_learning_rate} exceeds peak_learning_rate "
                                     f"{peak}")
    check_float(config, "weight_decay")
    check_float(config, "grad_clip")
    if config.optimizer not in OPTIMIZERS:
        _fail("optimizer", f"must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    for field in ("muon_ns_dtype", "momentum_dtype"):
        if config[field] not in OPTIMIZER_DTYPES:
            _fail(field, f"must be one of {OPTIMIZER_DTYPES}, got {config[field]!r}")


def check_tokenizer(config, workdir_has_tokenizer: bool) -> None:
    if not config.tokenizer_path and not config.train_tokenizer and not workdir_has_tokenizer:
        _fail("tokenizer_path", "is empty: set it to the model's tokenizer.json, or set "
              f"train_tokenizer=True to train a {config.tokenizer_vocab_size}-token BPE on the "
              "corpus")
    if not config.tokenizer_path:
        check_int(config, "tokenizer_vocab_size", 256)


def check_batches(config) -> None:
    check_int(config, "seq_len", 2)
    batch = check_int(config, "batch_size", 1)
    micro = check_int(config, "micro_batches", 1)
    processes = jax.process_count()
    if batch % (micro * processes):
        _fail("batch_size", f"{batch} is not divisible by micro_batches {micro} x processes "
                            f"{processes}")


def validate_pretrain(config, *, workdir_has_tokenizer: bool = False) -> ModelConfig:
    """Checks every field a pre-training run reads -> the model config (placeholder vocab)."""
    check_int(config, "steps", 1)
    check_int(config, "log_every", 1)
    check_int(config, "checkpoint_every", 1)
    check_int(config, "keep_checkpoints", 1)
    check_int(config, "eval.heldout_chars", 0)
    check_int(config, "eval.every", 0)
    if config.eval.heldout_chars and not config.data.stdlib.build:
        _fail("eval.heldout_chars", "needs the stdlib corpus (data.stdlib.build=True): its "
                                    "held-out modules are the text")
    check_batches(config)
    check_optimizer(config)
    check_mesh(config)
    check_tokenizer(config, workdir_has_tokenizer)
    model = check_model(config)
    check_step(config, model)
    if config.data.packing.method not in ("concat_then_split", "best_fit"):
        _fail("data.packing.method", f"must be 'concat_then_split' or 'best_fit', got "
                                     f"{config.data.packing.method!r}")
    return model
