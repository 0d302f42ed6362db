"""Greedy speculative decoding with the MTP head as the drafter (one draft token per step).

Each step feeds the main model two tokens: the token it already chose and the MTP layer's guess
for the one after. If the main model's own greedy choice after the first equals the guess, both
are kept and the second position's prediction comes for free (two tokens for one forward);
otherwise the guess's cache slot is rewound and one token is kept. The MTP layer keeps its own KV
cache, fed (main hidden state at t, token t+1) pairs exactly as in training. The output is the
plain greedy output, token for token. One sequence at a time: rows of a batch would accept
different numbers of tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.errors import InputError
from glm_jax.model import GlmMoeModel
from glm_jax.model.cache import KVCache


class SpeculativeResult(NamedTuple):
    tokens: list[int]
    drafts: int  # MTP guesses checked
    accepted: int  # guesses the main model agreed with
    main_forwards: int  # main-model passes after the prefill

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafts, 1)


@functools.partial(jax.jit, static_argnums=0)
def _main(graphdef, state, ids, cache):
    out, cache = nnx.merge(graphdef, state).forward_cached(ids, cache)
    return jnp.argmax(out.logits, -1).astype(jnp.int32), out.hidden, cache


@functools.partial(jax.jit, static_argnums=0)
def _draft(graphdef, state, hidden, next_ids, cache):
    logits, cache = nnx.merge(graphdef, state).mtp_cached(hidden, next_ids, cache)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache


def speculative_greedy(model: GlmMoeModel, prompt: Sequence[int], *, max_new_tokens: int,
                       stop_tokens: Sequence[int] = ()) -> SpeculativeResult:
    if model.mtp is None:
        raise InputError("speculative decoding drafts with the MTP layer, and this model has "
                         "none (config.num_nextn_predict_layers == 0, e.g. a checkpoint saved by "
                         "transformers)")
    graphdef, state = nnx.split(model)
    length = len(prompt) + max_new_tokens + 2
    main = KVCache.create(model.config, 1, length)
    mtp = KVCache.create(model.config, 1, length, mtp=True)
    ids = jnp.asarray([prompt], jnp.int32)
    greedy, hidden, main = _main(graphdef, state, ids, main)
    token = greedy[:, -1]  # [1]
    draft, mtp = _draft(graphdef, state, hidden, jnp.concatenate([ids[:, 1:], token[:, None]], 1),
                        mtp)
    tokens, drafts, accepted, forwards = [int(token[0])], 0, 0, 0
    while len(tokens) < max_new_tokens and tokens[-1] not in stop_tokens:
        greedy, hidden, main = _main(graphdef, state, jnp.stack([token, draft], 1), main)
        forwards += 1
        drafts += 1
        if int(greedy[0, 0]) == int(draft[0]):  # the guess is what greedy decoding picks
            accepted += 1
            token = greedy[:, 1]
            tokens += [int(draft[0]), int(token[0])]
            draft, mtp = _draft(graphdef, state, hidden, jnp.stack([draft, token], 1), mtp)
        else:
            token = greedy[:, 0]
            tokens.append(int(token[0]))
            main = main.truncate(main.length - 1)
            draft, mtp = _draft(graphdef, state, hidden[:, :1], token[:, None], mtp)
    for i, t in enumerate(tokens):
        if t in stop_tokens:
            tokens = tokens[:i + 1]
            break
    return SpeculativeResult(tokens[:max_new_tokens], drafts, accepted, forwards)
