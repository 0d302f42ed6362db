"""The key/value cache for incremental decoding: one preallocated [L, B, T, K, D] buffer per
layer stack, filled slot by slot. A batch of prompts of different lengths is left-padded; `valid`
marks which slots hold real tokens, so padding is never attended to and positions count real
tokens only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from glm_jax.config import ModelConfig
from glm_jax.errors import InputError


class KVCache(struct.PyTreeNode):
    k: dict[str, jax.Array]  # stack name -> [L, B, T, K, D]
    v: dict[str, jax.Array]
    valid: jax.Array  # [B, T] bool: the slot holds a real token
    next_position: jax.Array  # [B] int32: position of each row's next real token
    length: jax.Array  # [] int32: slots written so far (the same for every row)

    @classmethod
    def create(cls, config: ModelConfig, batch: int, max_length: int, dtype=None, *,
               mtp: bool = False) -> KVCache:
        """The main model's cache, or with `mtp` the MTP layer's (one layer, stack "mtp")."""
        dtype = dtype or config.jnp_dtype
        stacks = ({"mtp": 1} if mtp else {"dense_layers": config.first_k_dense_replace,
                                          "moe_layers": config.num_moe_layers})
        shape = (batch, max_length, config.num_key_value_heads, config.head_dim)
        k = {name: jnp.zeros((n,) + shape, dtype) for name, n in stacks.items() if n}
        return cls(k=k, v=jax.tree.map(jnp.zeros_like, k),
                   valid=jnp.zeros((batch, max_length), bool),
                   next_position=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    def advance(self, valid):
        """Marks the next S slots (valid [B, S]) -> (cache, positions [B, S], attention mask
        [B, 1, 1, S, T]): query s sees the valid slots up to and including its own."""
        s = valid.shape[1]
        if not isinstance(self.length, jax.core.Tracer) and int(self.length) + s > self.max_length:
            raise InputError(f"KV cache overflow: {int(self.length)} slots used + {s} new > "
                             f"max_length {self.max_length}")
        slots = self.length + jnp.arange(s)  # [S]
        all_valid = jax.lax.dynamic_update_slice_in_dim(self.valid, valid, self.length, 1)
        positions = self.next_position[:, None] + jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1
        positions = jnp.maximum(positions, 0)
        causal = jnp.arange(self.max_length)[None, :] <= slots[:, None]  # [S, T]
        mask = (all_valid[:, None, :] & causal[None])[:, None, None]
        cache = self.replace(valid=all_valid,
                             next_position=self.next_position + jnp.sum(valid, 1, dtype=jnp.int32))
        return cache, positions, mask

    def truncate(self, length) -> KVCache:
        """Keeps the first `length` slots and forgets the rest (a rejected speculative draft, a
        chat turn that diverges from what the cache holds); the next write reuses them."""
        kept = jnp.arange(self.max_length) < length  # [T]
        valid = self.valid & kept[None]
        return self.replace(valid=valid, next_position=jnp.sum(valid, 1, dtype=jnp.int32),
                            length=jnp.asarray(length, jnp.int32))

    def grow(self, max_length: int) -> KVCache:
        """The same contents in a cache of `max_length` slots (>= the current one)."""
        extra = max_length - self.max_length
        pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
        return self.replace(k=jax.tree.map(lambda x: pad(x, 2), self.k),
                            v=jax.tree.map(lambda x: pad(x, 2), self.v), valid=pad(self.valid, 1))
