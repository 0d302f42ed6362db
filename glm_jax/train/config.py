"""Defaults shared by every pre-training config (configs/pretrain_*.py override them)."""

from __future__ import annotations

import ml_collections

from glm_jax.data import default_data_config


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
    config.head_with_adam = False
    config.seq_len = 4096
    config.batch_size = 8  # sequences per step, global
    config.micro_batches = 1  # gradient accumulation: batch_size / micro_batches per pass
    # Batch-size warm-up (SPEC.md §3: 16M -> 64M tokens over 500B): start_batch sequences (0 =
    # off) ramping to batch_size in `stages` steps over ramp_tokens, by accumulating fewer
    # micro-batches early on.
    config.batch_warmup = ml_collections.ConfigDict(dict(start_batch=0, ramp_tokens=0, stages=4))
    config.step = ml_collections.ConfigDict(dict(
        mtp_weight=0.3, mtp_weight_after=0.1, mtp_weight_switch_step=-1, aux_weight=1e-4,
        bias_rate=1e-3, bias_stop_step=-1, spike_factor=3.0, spike_warmup_steps=20))
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.tokenizer_path = ""  # a tokenizer.json; empty: train a byte-level BPE on the corpus
    config.tokenizer_vocab_size = 4096
    config.peak_flops_per_device = 0.0  # for MFU; 0 leaves MFU out (e.g. on CPU)
    config.data = default_data_config()
    return config
