"""GLM-4.5's schedules (SPEC §3): learning rate warm-up then cosine decay, and batch-size warm-up.

The learning rate is an optax schedule (a function of the step, usable inside jit). The batch
size is a plain Python function of the tokens seen: a new batch size changes the number of
gradient-accumulation micro-steps, which the trainer decides on the host between steps.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import optax


def warmup_cosine(warmup_steps: int, total_steps: int, *, peak: float = 2.5e-4,
                  floor: float = 2.5e-5) -> optax.Schedule:
    """Linear 0 -> `peak` over `warmup_steps`, then cosine `peak` -> `floor`, reached at
    `total_steps` (counted from step 0, warm-up included) and held after."""
    if not 0 < warmup_steps < total_steps:
        raise ValueError(f"need 0 < warmup_steps < total_steps, got {warmup_steps}, {total_steps}")
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak,
                                              warmup_steps=warmup_steps, decay_steps=total_steps,
                                              end_value=floor)


class BatchSize(NamedTuple):
    sequences: int  # global batch, in sequences
    accumulation_steps: int  # sequences // micro_batch: micro-steps summed into one update


def batch_size_schedule(*, start_tokens: int, end_tokens: int, ramp_tokens: int, seq_len: int,
                        micro_batch: int, stages: int = 4) -> Callable[[int], BatchSize]:
    """Batch-size warm-up: returns `batch_at(tokens_seen) -> BatchSize`.

    [0, ramp_tokens) is cut into `stages` equal spans; span i uses a batch of
    `start + (end - start) * i / stages` tokens, and `end_tokens` is used from `ramp_tokens` on
    (as Megatron's `--rampup-batch-size`: e.g. 16M -> 64M tokens over 500B tokens in 3 stages is
    16M, 32M, 48M, then 64M). Batches are rounded to whole micro-batches: `micro_batch` is the
    sequences of one accumulation micro-step across all data-parallel replicas (so a multiple of
    the data-parallel size, and then so is every batch)."""
    if not 0 < start_tokens <= end_tokens:
        raise ValueError(f"need 0 < start_tokens <= end_tokens, got {start_tokens}, {end_tokens}")
    if ramp_tokens <= 0 or stages <= 0 or seq_len <= 0 or micro_batch <= 0:
        raise ValueError("ramp_tokens, stages, seq_len and micro_batch must be positive")

    def to_batch(tokens: float) -> BatchSize:
        micro_steps = max(1, round(tokens / (seq_len * micro_batch)))
        return BatchSize(micro_steps * micro_batch, micro_steps)

    levels = [to_batch(start_tokens + (end_tokens - start_tokens) * i / stages)
              for i in range(stages)]
    final = to_batch(end_tokens)

    def batch_at(tokens_seen: int) -> BatchSize:
        if tokens_seen >= ramp_tokens:
            return final
        return levels[max(0, tokens_seen) * stages // ramp_tokens]

    return batch_at
