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
    # With record_routing: per row, the experts every MoE layer chose for each of its tokens,
    # prompt then generation, [len(prompt) + length, MoE layers, k] (for routing replay).
    routing: tuple[np.ndarray, ...] | None = None


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


def routing_dtype(config):
    """Recorded expert ids in one byte when the experts fit (GLM-4.5: 160)."""
    return jnp.uint8 if config.n_routed_experts <= 256 else jnp.int32


def _expert_ids(out, config):
    """[B, S, MoE layers, k] expert ids of a forward, or an empty array for a dense model."""
    if out.moe_stats is None:
        return jnp.zeros((*out.logits.shape[:2], 0, config.num_experts_per_tok), jnp.int32)
    return jnp.moveaxis(out.moe_stats.expert_ids, 0, 2).astype(routing_dtype(config))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(3,))
def prefill(graphdef, state, ids, cache, valid, record_routing=False):
    """Runs ids [B, S] into the next S slots of `cache` -> (last logits [B, V], cache), and
    with `record_routing` the prompt's expert ids [B, S, MoE layers, k]."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    out, cache = model.forward_cached(ids, cache, valid=valid)
    if record_routing:
        return out.logits[:, -1], cache, _expert_ids(out, model.config)
    return out.logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=(2,))
def decode(graphdef, state, cache, logits, keys, traced, static, width, record_routing=False):
    """Samples up to `max_new_tokens` (traced) tokens per row into a [B, width] buffer; every
    sampled token is fed back, so the returned cache holds prompt + generation.
    `traced` = (temperature, top_p, max_new_tokens, pad_id, stop_tokens [n]).
    -> (tokens, logprobs, lengths, cache, routing [B, width, MoE layers, k] or None): with
    `record_routing`, the experts chosen for each sampled token when it was fed back."""
    TRACES["decode"] += 1
    temperature, top_p, max_new_tokens, pad_id, stop_tokens = traced
    model = nnx.merge(graphdef, state)
    config = model.config
    batch = logits.shape[0]
    layers = config.num_moe_layers if record_routing else 0
    routing = jnp.zeros((batch, width, layers, config.num_experts_per_tok),
                        routing_dtype(config))

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, done, tokens, logprobs, lengths, routing = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        token, logprob = _sample(logits, step_keys, (temperature, top_p), static)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, 1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(
            logprobs, jnp.where(done, 0.0, logprob)[:, None], step, 1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_tokens)
        out, cache = model.forward_cached(token[:, None], cache)
        if record_routing:
            routing = jax.lax.dynamic_update_slice_in_dim(routing, _expert_ids(out, config),
                                                          step, 1)
        return step + 1, cache, out.logits[:, 0], done, tokens, logprobs, lengths, routing

    carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((batch,), bool),
             jnp.full((batch, width), pad_id, jnp.int32), jnp.zeros((batch, width), jnp.float32),
             jnp.zeros((batch,), jnp.int32), routing)
    _, cache, _, _, tokens, logprobs, lengths, routing = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, cache, (routing if record_routing else None)


def stop_array(stop_tokens: Sequence[int]) -> jax.Array:
    """Stop ids padded with -1 (never sampled) to a multiple of STOP_SLOTS."""
    stops = list(stop_tokens)
    return jnp.asarray(stops + [-1] * (bucket(len(stops) + 1, STOP_SLOTS) - len(stops)), jnp.int32)


def seed_keys(seeds, batch: int):
    seeds = np.arange(batch) if seeds is None else np.asarray(seeds)
    if seeds.shape != (batch,):
        raise InputError(f"need one seed per prompt, got {seeds.shape} for {batch}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _start(model: GlmMoeModel, prompts, max_new_tokens, seeds, pad_id, record_routing=False):
    """Validates, left-pads to a bucketed width and prefills into a cache with room for a
    bucketed token buffer -> (graphdef, state, cache, last logits, keys, buffer width, the
    prompts' expert ids [B, padded width, L, k] or None)."""
    check_prompts(prompts, model.config, max_new_tokens)
    keys = seed_keys(seeds, len(prompts))
    width = bucket(max_new_tokens)
    ids, valid = left_pad(prompts, pad_id, bucket(max(len(p) for p in prompts)))
    cache = KVCache.create(model.config, len(prompts), bucket(ids.shape[1] + width))
    graphdef, state = nnx.split(model)
    out = prefill(graphdef, state, jnp.asarray(ids), cache, jnp.asarray(valid), record_routing)
    logits, cache, prompt_routing = out if record_routing else (*out, None)
    return graphdef, state, cache, logits, keys, width, prompt_routing


def generate(model: GlmMoeModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
             seeds: Sequence[int] | None = None, pad_id: int = 0,
             record_routing: bool = False) -> Generation:
    """Samples up to `max_new_tokens` after each prompt; a row stops at its first stop token.
    `record_routing` also returns every token's selected experts (`Generation.routing`)."""
    graphdef, state, cache, logits, keys, width, prompt_routing = _start(
        model, prompts, max_new_tokens, seeds, pad_id, record_routing)
    traced = (*sampling.traced, jnp.int32(max_new_tokens), jnp.int32(pad_id),
              stop_array(stop_tokens))
    tokens, logprobs, lengths, _, routing = decode(graphdef, state, cache, logits, keys, traced,
                                                   sampling.static, width, record_routing)
    tokens, logprobs, lengths, routing, prompt_routing = jax.device_get(
        (tokens, logprobs, lengths, routing, prompt_routing))
    rows = None
    if record_routing:
        padded = prompt_routing.shape[1]
        rows = tuple(np.concatenate([prompt_routing[i, padded - len(p):],
                                     routing[i, :lengths[i]]]) for i, p in enumerate(prompts))
    return Generation(tokens[:, :max_new_tokens], logprobs[:, :max_new_tokens], lengths, rows)


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
    graphdef, state, cache, logits, keys, _, _ = _start(model, [prompt], max_new_tokens, [seed],
                                                        0)

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
