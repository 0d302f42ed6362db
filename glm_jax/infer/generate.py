"""Batched generation over a preallocated KV cache: one jitted prefill, then a jitted
`lax.while_loop` of single-token decode steps with the cache donated.

Prompts of different lengths are left-padded (padding slots are masked out, positions count
real tokens only). Sampling: greedy (temperature 0), temperature, top-k, top-p, each row with
its own seed. Returned log-probs are the model's own (temperature 1, unfiltered) log-probs of the
chosen tokens, which is what RL importance ratios need.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.model import GlmMoeModel
from glm_jax.model.cache import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, "
                             "top_k >= 0, 0 < top_p <= 1")


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32, `pad_id` after a row stopped
    logprobs: np.ndarray  # [B, max_new_tokens] float32, 0 after a row stopped
    lengths: np.ndarray  # [B] int32 generated tokens per row, a stop token included


def sample(logits, keys, sampling: SamplingConfig):
    """logits [B, V], keys [B] -> tokens [B] int32."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        before = before - jax.nn.softmax(sorted_logits, axis=-1)  # mass of better tokens
        drop_sorted = before >= sampling.top_p  # keeps the smallest set reaching top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
            drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """-> ids [B, P] int32 and valid [B, P] bool, prompts aligned to the right."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        valid[row, width - len(prompt):] = True
    return ids, valid


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _prefill(graphdef, state, ids, cache, valid):
    out, cache = nnx.merge(graphdef, state).forward_cached(ids, cache, valid=valid)
    return out.logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))  # the loop updates the cache in place
def _decode_loop(graphdef, state, cache, logits, keys, sampling, max_new_tokens, pad_id,
                 stop_tokens):
    model = nnx.merge(graphdef, state)
    batch = logits.shape[0]

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, done, tokens, logprobs, lengths = carry
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        token = sample(logits, step_keys, sampling)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                      token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(token, stop_tokens)
        out, cache = model.forward_cached(token[:, None], cache)
        return step + 1, cache, out.logits[:, 0], done, tokens, logprobs, lengths

    carry = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((batch,), bool),
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
             jnp.zeros((batch, max_new_tokens), jnp.float32), jnp.zeros((batch,), jnp.int32))
    _, _, _, _, tokens, logprobs, lengths = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths


def _setup(model: GlmMoeModel, prompts, max_new_tokens, seeds, pad_id):
    ids, valid = left_pad(prompts, pad_id)
    seeds = np.arange(len(prompts)) if seeds is None else np.asarray(seeds)
    if seeds.shape != (len(prompts),):
        raise ValueError(f"need one seed per prompt, got {seeds.shape} for {len(prompts)}")
    cache = KVCache.create(model.config, len(prompts), ids.shape[1] + max_new_tokens)
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, jnp.asarray(ids), cache, jnp.asarray(valid))
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return graphdef, state, cache, logits, keys


def generate(model: GlmMoeModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
             seeds: Sequence[int] | None = None, pad_id: int = 0) -> Generation:
    """Samples up to `max_new_tokens` after each prompt; a row stops at its first stop token."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graphdef, state, cache, logits, keys = _setup(model, prompts, max_new_tokens, seeds, pad_id)
    tokens, logprobs, lengths = _decode_loop(
        graphdef, state, cache, logits, keys, sampling, max_new_tokens, pad_id,
        jnp.asarray(list(stop_tokens) or [-1], jnp.int32))
    return Generation(*jax.device_get((tokens, logprobs, lengths)))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def _stream_step(graphdef, state, cache, logits, key, sampling):
    token = sample(logits, key[None], sampling)
    out, cache = nnx.merge(graphdef, state).forward_cached(token[:, None], cache)
    return token[0], out.logits[:, 0], cache


def stream(model: GlmMoeModel, prompt: Sequence[int], *, max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
           seed: int = 0) -> Iterator[int]:
    """Yields tokens of one prompt as they are decoded (for interactive use)."""
    graphdef, state, cache, logits, keys = _setup(model, [prompt], max_new_tokens, [seed], 0)
    for step in range(max_new_tokens):
        token, logits, cache = _stream_step(graphdef, state, cache, logits,
                                            jax.random.fold_in(keys[0], step), sampling)
        token = int(token)
        yield token
        if token in stop_tokens:
            return
