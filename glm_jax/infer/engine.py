"""Batched generation over a preallocated KV cache: one jitted prefill, then a jitted
`lax.while_loop` of single-token decode steps with the cache donated.

Shapes are bucketed so that a serving loop or an RL rollout compiles once per bucket, not once
per request: prompt widths and the token buffer round up to powers of two (at least
`BUCKET_MIN`), the cache length to the power of two that holds both, and `max_new_tokens`, the
temperature, top-p, the pad id and the stop tokens are traced values. Only the batch size, top-k
and whether sampling is greedy / nucleus are part of a compiled shape.

Prompts of different lengths are left-padded (padding slots are masked out, positions count
real tokens only). Sampling: greedy (temperature 0), temperature, top-k, top-p, each row with
its own seed. Returned log-probs are those of the temperature-scaled, unfiltered distribution
(log_softmax(logits / T); T = 1 for greedy), which is what an RL trainer that divides its
logits by the same temperature recomputes (SPEC.md §4b).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.errors import InputError
from glm_jax.model import GlmMoeModel
from glm_jax.model.cache import KVCache

BUCKET_MIN = 64
STOP_SLOTS = 8  # stop-token lists are padded to a multiple of this (no retrace per list)
# Times each engine function has been traced (compiled) in this process; tests read it.
TRACES: collections.Counter[str] = collections.Counter()


def bucket(n: int, minimum: int = BUCKET_MIN) -> int:
    """The smallest power of two >= n, and at least `minimum`."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        ok = (isinstance(self.top_k, int) and self.top_k >= 0
              and math.isfinite(self.temperature) and self.temperature >= 0
              and math.isfinite(self.top_p) and 0 < self.top_p <= 1)
        if not ok:
            raise InputError(f"invalid sampling settings {self}: need a finite temperature >= 0, "
                             "an integer top_k >= 0 and 0 < top_p <= 1")

    @property
    def static(self) -> tuple[bool, int, bool]:
        """What changes the compiled program: (greedy, top_k, nucleus)."""
        return self.temperature == 0, self.top_k, self.top_p < 1

    @property
    def traced(self) -> tuple[jax.Array, jax.Array]:
        return jnp.float32(self.temperature), jnp.float32(self.top_p)


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32, `pad_id` after a row stopped
    logprobs: np.ndarray  # [B, max_new_tokens] float32, 0 after a row stopped
    lengths: np.ndarray  # [B] int32 generated tokens per row, a stop token included


def sample(logits, keys, sampling: SamplingConfig):
    """logits [B, V], keys [B] -> tokens [B] int32."""
    return _sample(logits, keys, sampling.traced, sampling.static)[0]


def _sample(logits, keys, traced, static):
    """-> (tokens [B] int32, their log-probs [B] under log_softmax(logits / T))."""
    (temperature, top_p), (greedy, top_k, nucleus) = traced, static
    logits = logits.astype(jnp.float32)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, _logprob(jax.nn.log_softmax(logits), tokens)
    logits = logits / temperature
    logprobs = jax.nn.log_softmax(logits)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if nucleus:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of better tokens
        drop_sorted = before >= top_p  # keeps the smallest set reaching top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
            drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    tokens = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return tokens, _logprob(logprobs, tokens)


def _logprob(logprobs, tokens):
    return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def check_prompts(prompts: Sequence[Sequence[int]], config, max_new_tokens: int) -> None:
    """Token ids inside the vocabulary, lengths inside the model's positions."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or (
            max_new_tokens < 1):
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token")
    for row, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"prompt {row}: token ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= config.vocab_size)
        if bad.any():
            raise InputError(f"prompt {row}: token id {int(ids[bad][0])} at position "
                             f"{int(np.argmax(bad))} is outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if len(prompt) + max_new_tokens > config.max_position_embeddings:
            raise InputError(f"prompt {row}: {len(prompt)} tokens + {max_new_tokens} new exceed "
                             f"max_position_embeddings {config.max_position_embeddings}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None):
    """-> ids [B, width] int32 and valid [B, width] bool, prompts aligned to the right; width
    defaults to the longest prompt."""
    width = width or max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        valid[row, width - len(prompt):] = True
    return ids, valid


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def prefill(graphdef, state, ids, cache, valid):
    """Runs ids [B, S] into the next S slots of `cache` -> (last logits [B, V], cache)."""
    TRACES["prefill"] += 1
    out, cache = nnx.merge(graphdef, state).forward_cached(ids, cache, valid=valid)
    return out.logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def decode(graphdef, state, cache, logits, keys, traced, static, width):
    """Samples up to `max_new_tokens` (traced) tokens per row into a [B, width] buffer; every
    sampled token is fed back, so the returned cache holds prompt + generation.
    `traced` = (temperature, top_p, max_new_tokens, pad_id, stop_tokens [n])."""
    TRACES["decode"] += 1
    temperature, top_p, max_new_tokens, pad_id, stop_tokens = traced
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, done, tokens, logprobs, lengths = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        token, logprob = _sample(logits, step_keys, (temperature, top_p), static)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, 1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            logprobs, jnp.where(done, 0.0, logprob)[:, None], step, 1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_tokens)
        out, cache = model.forward_cached(token[:, None], cache)
        return step + 1, cache, out.logits[:, 0], done, tokens, logprobs, lengths

    carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((batch,), bool),
             jnp.full((batch, width), pad_id, jnp.int32), jnp.zeros((batch, width), jnp.float32),
             jnp.zeros((batch,), jnp.int32))
    _, cache, _, _, tokens, logprobs, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, cache


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop ids padded with -1 (never sampled) to a multiple of STOP_SLOTS."""
    stops = list(stop_tokens)
    return jnp.asarray(stops + [-1] * (bucket(len(stops) + 1, STOP_SLOTS) - len(stops)), jnp.int32)


def seed_keys(seeds, batch: int):
    seeds = np.arange(batch) if seeds is None else np.asarray(seeds)
    if seeds.shape != (batch,):
        raise InputError(f"need one seed per prompt, got {seeds.shape} for {batch}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _start(model: GlmMoeModel, prompts, max_new_tokens, seeds, pad_id):
    """Validates, left-pads to a bucketed width and prefills into a cache with room for a
    bucketed token buffer -> (graphdef, state, cache, last logits, keys, buffer width)."""
    check_prompts(prompts, model.config, max_new_tokens)
    keys = seed_keys(seeds, len(prompts))
    width = bucket(max_new_tokens)
    ids, valid = left_pad(prompts, pad_id, bucket(max(len(p) for p in prompts)))
    cache = KVCache.create(model.config, len(prompts), bucket(ids.shape[1] + width))
    graphdef, state = nnx.split(model)
    logits, cache = prefill(graphdef, state, jnp.asarray(ids), cache, jnp.asarray(valid))
    return graphdef, state, cache, logits, keys, width


def generate(model: GlmMoeModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
             seeds: Sequence[int] | None = None, pad_id: int = 0) -> Generation:
    """Samples up to `max_new_tokens` after each prompt; a row stops at its first stop token."""
    graphdef, state, cache, logits, keys, width = _start(model, prompts, max_new_tokens, seeds,
                                                         pad_id)
    traced = (*sampling.traced, jnp.int32(max_new_tokens), jnp.int32(pad_id),
              stop_array(stop_tokens))
    tokens, logprobs, lengths, _ = decode(graphdef, state, cache, logits, keys, traced,
                                          sampling.static, width)
    tokens, logprobs, lengths = jax.device_get((tokens, logprobs, lengths))
    return Generation(tokens[:, :max_new_tokens], logprobs[:, :max_new_tokens], lengths)


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _stream_step(graphdef, state, cache, logits, key, traced, static):
    TRACES["stream_step"] += 1
    token, _ = _sample(logits, key[None], traced, static)
    out, cache = nnx.merge(graphdef, state).forward_cached(token[:, None], cache)
    return token[0], out.logits[:, 0], cache


def stream(model: GlmMoeModel, prompt: Sequence[int], *, max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
           seed: int = 0) -> Iterator[int]:
    """Yields tokens of one prompt as they are decoded (for interactive use); the same tokens
    as `generate` with the same seed. Bad input raises here, not at the first token."""
    graphdef, state, cache, logits, keys, _ = _start(model, [prompt], max_new_tokens, [seed], 0)

    def tokens(cache, logits):
        for step in range(max_new_tokens):
            token, logits, cache = _stream_step(graphdef, state, cache, logits,
                                                jax.random.fold_in(keys[0], step),
                                                sampling.traced, sampling.static)
            token = int(token)
            yield token
            if token in stop_tokens:
                return

    return tokens(cache, logits)
