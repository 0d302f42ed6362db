"""A multi-turn conversation over one KV cache kept across turns.

Each turn the caller hands over the whole rendered conversation; the session finds the longest
prefix its cache already holds and prefills only the rest. Most of a chat is a stable prefix; the
exception is the template itself: earlier turns' reasoning is re-rendered as an empty think block
once a new user message arrives, so after a thinking turn the cache is truncated to where the
rendering diverges and re-read from there (which is what the model would see anyway).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.infer.engine import (SamplingConfig, bucket, check_prompts, decode, left_pad,
                                    prefill, seed_keys, stop_array)
from glm_jax.model import GlmMoeModel
from glm_jax.model.cache import KVCache

_PAD = -1  # a cache slot that holds padding, not a token


class ChatSession:
    def __init__(self, model: GlmMoeModel, *, sampling: SamplingConfig = SamplingConfig(),
                 stop_tokens: Sequence[int] = (), seed: int = 0):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.sampling, self.stops = sampling, stop_array(stop_tokens)
        self.seed, self.turns = seed, 0
        self.cache: KVCache | None = None
        self.slots: list[int] = []  # the token in each written cache slot, _PAD for padding
        self.prefilled = 0  # prompt tokens run through the model so far (cache hits excluded)

    def reply(self, prompt: Sequence[int], *, max_new_tokens: int) -> list[int]:
        """Generates after `prompt` (the whole conversation so far, rendered and tokenised)."""
        prompt = [int(t) for t in prompt]
        check_prompts([prompt], self.config, max_new_tokens)
        real = [i for i, t in enumerate(self.slots) if t != _PAD]
        keep = 0  # prompt tokens already in the cache; the last one is always re-run (logits)
        while (keep < min(len(real), len(prompt) - 1)
               and self.slots[real[keep]] == prompt[keep]):
            keep += 1
        keep_slots = real[keep - 1] + 1 if keep else 0
        new = prompt[keep:]
        width, out_width = bucket(len(new)), bucket(max_new_tokens)
        needed = bucket(keep_slots + width + out_width)
        if self.cache is None:
            self.cache = KVCache.create(self.config, 1, needed)
        else:
            self.cache = self.cache.truncate(keep_slots)
            if needed > self.cache.max_length:
                self.cache = self.cache.grow(needed)
        ids, valid = left_pad([new], 0, width)
        logits, cache = prefill(self.graphdef, self.state, jnp.asarray(ids), self.cache,
                                jnp.asarray(valid))
        traced = (*self.sampling.traced, jnp.int32(max_new_tokens), jnp.int32(0), self.stops)
        keys = seed_keys([self.seed + self.turns], 1)
        tokens, _, lengths, self.cache, _ = decode(self.graphdef, self.state, cache, logits,
                                                   keys, traced, self.sampling.static, out_width)
        tokens, lengths = jax.device_get((tokens, lengths))
        generated = tokens[0, :lengths[0]].tolist()
        # Every generated token was fed back into the cache.
        self.slots = self.slots[:keep_slots] + [_PAD] * (width - len(new)) + new + generated
        self.prefilled += len(new)
        self.turns += 1
        return generated
