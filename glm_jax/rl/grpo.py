"""The GRPO update as a pure function: `grpo_step(graphdef, state, batch, rng, ...)` recomputes
the policy's log-probs of the rollout's tokens (logits divided by the rollout temperature,
SPEC.md §4b), takes the clipped surrogate against the rollout's log-probs, aggregates it, adds
the optional k3 KL to a frozen reference, and applies one optimizer update accumulated over
micro-batches. `make_grpo_step` jits it with the state donated.

A batch is `[A, B, S]` (A micro-batches of B rows): `input_ids`, `target_ids`, `segment_ids`
(1 on real tokens, 0 on padding), `positions`, `mask` (1 where the target is a token the policy
sampled), `old_logp` (the rollout's log-prob of each target), `advantages` `[A, B]`,
`temperature` (a scalar), and optionally `routing` `[A, B, S, MoE layers, k]` (routing replay:
the experts the rollout chose for each input token) and `is_weight` (truncated IS weights).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import numpy as np

from glm_jax.optim.clipping import clip_by_global_norm
from glm_jax.rl.objectives import AGGREGATIONS, aggregate_loss, k3_kl, token_policy_loss
from glm_jax.train.balance import update_router_biases
from glm_jax.train.step import TrainState, _zero_loads

# Times grpo_step / policy_logp have been traced (compiled) in this process; tests read it.
TRACES: collections.Counter[str] = collections.Counter()

@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_c: float | None = None  # dual clip for negative advantages (> 1), off by default
    aggregation: str = "seq-mean-token-mean"
    kl_beta: float = 0.0  # GLM-4.5 trains without KL
    bias_rate: float = 0.0  # balance-bias updates from the step's expert loads (0 = frozen)
    grad_clip: float = 0.0  # clip the gradients to this global norm (0: never)

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("eps_low and eps_high must be >= 0")


def rollout_batch(prompts, completions, logprobs, advantages, *, seq_len: int,
                  micro_batches: int = 1, temperature: float = 1.0,
                  routing=None, completion_masks=None) -> dict[str, np.ndarray]:
    """Host-side training batch from rollouts: row i is prompt i then its completion,
    right-padded to `seq_len + 1` tokens; the mask marks the targets that are completion tokens
    and `old_logp` holds their rollout log-probs. Rows split into `micro_batches` equal parts.
    `routing` (routing replay): per row the rollout's expert ids [tokens, MoE layers, k] (at
    least the row's input tokens; empty for a padding row) -> `batch["routing"]`.
    `completion_masks` (multi-turn episodes): per row one 0/1 per completion token, 0 on tokens
    the environment inserted: no loss there, and `old_logp` 0."""
    rows = len(prompts)
    if not rows == len(completions) == len(logprobs) == len(advantages):
        raise ValueError("prompts, completions, logprobs and advantages differ in length")
    if rows % micro_batches:
        raise ValueError(f"{rows} rows do not split into {micro_batches} micro-batches")
    out = {k: np.zeros((rows, seq_len), np.int32)
           for k in ("input_ids", "target_ids", "segment_ids", "positions")}
    out["mask"] = np.zeros((rows, seq_len), np.float32)
    out["old_logp"] = np.zeros((rows, seq_len), np.float32)
    if routing is not None:
        shape = next((r.shape[1:] for r in routing if len(r)), None)
        if shape is None:
            raise ValueError("routing: every row is empty")
        out["routing"] = np.zeros((rows, seq_len, *shape), next(
            r.dtype for r in routing if len(r)))
    for i, (prompt, completion, logp) in enumerate(zip(prompts, completions, logprobs)):
        sequence = list(prompt) + list(completion)
        if len(sequence) - 1 > seq_len:
            raise ValueError(f"row {i}: {len(sequence)} tokens exceed seq_len + 1 = {seq_len + 1}")
        if len(logp) != len(completion):
            raise ValueError(f"row {i}: {len(completion)} tokens but {len(logp)} log-probs")
        keep = 1.0 if completion_masks is None else np.asarray(completion_masks[i], np.float32)
        if completion_masks is not None and len(keep) != len(completion):
            raise ValueError(f"row {i}: {len(completion)} tokens but a mask of {len(keep)}")
        n = len(sequence) - 1
        out["input_ids"][i, :n] = sequence[:-1]
        out["target_ids"][i, :n] = sequence[1:]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
        first = len(prompt) - 1  # the position whose target is the first completion token
        out["mask"][i, first:n] = keep
        out["old_logp"][i, first:n] = np.asarray(logp, np.float32) * keep
        if routing is not None and n > 0:
            if len(routing[i]) < n:
                raise ValueError(f"row {i}: routing holds {len(routing[i])} tokens, the row's "
                                 f"inputs are {n}")
            out["routing"][i, :n] = routing[i][:n]
    out["advantages"] = np.asarray(advantages, np.float32)
    out = {k: v.reshape(micro_batches, rows // micro_batches, *v.shape[1:]) for k, v in out.items()}
    out["temperature"] = np.float32(temperature)
    return out


def token_logp(model, batch, temperature):
    """-> (log p(target) [B, S], entropy [B, S]) under softmax(logits / temperature); with
    `batch["routing"]`, every MoE layer uses the rollout's experts (routing replay)."""
    out = model.forward(batch["input_ids"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], routing=batch.get("routing"))
    logits = out.logits.astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits)
    logp = jnp.take_along_axis(logp_all, batch["target_ids"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, out.moe_stats


def _micro_weight(mask, mode: str, totals) -> jax.Array:
    """This micro-batch's share of the global aggregate, so that summing the micro-batches'
    `aggregate_loss * weight` gives the aggregate over the whole batch."""
    if mode == "token-mean":
        return jnp.sum(mask) / jnp.maximum(totals["tokens"], 1.0)
    if mode == "seq-mean-token-mean":
        return jnp.sum(jnp.any(mask > 0, axis=1)) / jnp.maximum(totals["rows"], 1.0)
    return 1.0 / totals["micro"]  # seq-mean-token-sum and -scale: equal rows per micro-batch


def grpo_step(graphdef, state: TrainState, batch, rng, *, optimizer, config: GrpoConfig,
              ref_params=None):
    """-> (state, metrics). `rng` is unused by the loss (the MoE has no dropout); it is carried
    so a stochastic variant keeps this signature. `ref_params`: the frozen reference for the
    KL term (needed when config.kl_beta > 0)."""
    del rng
    TRACES["grpo_step"] += 1
    if config.kl_beta and ref_params is None:
        raise ValueError("kl_beta > 0 needs ref_params (the frozen reference policy)")
    temperature = batch["temperature"]
    micro_batches = {k: v for k, v in batch.items() if k != "temperature"}
    masks = batch["mask"]
    totals = {"tokens": jnp.sum(masks), "rows": jnp.sum(jnp.any(masks > 0, axis=-1)),
              "micro": masks.shape[0]}

    def micro_loss(params, micro):
        model = nnx.merge(graphdef, params, state.buffers)
        logp, entropy, stats = token_logp(model, micro, temperature)
        mask = micro["mask"]
        per_token = token_policy_loss(logp, micro["old_logp"], micro["advantages"],
                                      eps_low=config.eps_low, eps_high=config.eps_high,
                                      clip_c=config.clip_c)
        if "is_weight" in micro:  # truncated importance sampling for a mismatched sampler
            per_token = per_token * jax.lax.stop_gradient(micro["is_weight"])
        kl = jnp.zeros_like(logp)
        if config.kl_beta:
            reference = nnx.merge(graphdef, ref_params, state.buffers)
            ref_logp, _, _ = token_logp(reference, micro, temperature)
            kl = k3_kl(logp, jax.lax.stop_gradient(ref_logp))
            per_token = per_token + config.kl_beta * kl
        weight = _micro_weight(mask, config.aggregation, totals)
        loss = aggregate_loss(per_token, mask, config.aggregation) * weight
        ratio = jnp.exp(jnp.clip(logp - micro["old_logp"], -20.0, 20.0))
        advantages = jnp.broadcast_to(micro["advantages"][:, None], mask.shape)
        sums = dict(
            loss=loss, kl=jnp.sum(kl * mask), entropy=jnp.sum(entropy * mask),
            ratio=jnp.sum(ratio * mask), ratio_max=jnp.max(jnp.where(mask > 0, ratio, 0.0)),
            ratio_min=jnp.min(jnp.where(mask > 0, ratio, jnp.inf)),
            clip_low=jnp.sum(((ratio < 1 - config.eps_low) & (advantages < 0)) * mask),
            clip_high=jnp.sum(((ratio > 1 + config.eps_high) & (advantages > 0)) * mask),
            loads={"moe_layers": stats.tokens_per_expert} if stats is not None else {})
        return loss, sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
        grads, sums = carry
        (_, aux), g = grad_fn(state.params, micro)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        merged = {k: (jnp.maximum(sums[k], aux[k]) if k == "ratio_max" else
                      jnp.minimum(sums[k], aux[k]) if k == "ratio_min" else
                      jax.tree.map(jnp.add, sums[k], aux[k])) for k in sums}
        return (grads, merged), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    sums0 = dict(loss=jnp.float32(0), kl=jnp.float32(0), entropy=jnp.float32(0),
                 ratio=jnp.float32(0), ratio_max=jnp.float32(0), ratio_min=jnp.float32(jnp.inf),
                 clip_low=jnp.float32(0), clip_high=jnp.float32(0),
                 loads={"moe_layers": _zero_loads(state.buffers)["moe_layers"]}
                 if "moe_layers" in _zero_loads(state.buffers) else {})
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micro_batches)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grads, grad_norm = clip_by_global_norm(grads, config.grad_clip)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    buffers = state.buffers
    if config.bias_rate and sums["loads"]:
        buffers = update_router_biases(state.buffers, sums["loads"], config.bias_rate * finite)
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              buffers=buffers, opt_state=keep(opt_state, state.opt_state))
    tokens = jnp.maximum(totals["tokens"], 1.0)
    metrics = dict(pg_loss=sums["loss"], grad_norm=grad_norm, kl=sums["kl"] / tokens,
                   entropy=sums["entropy"] / tokens, ratio_mean=sums["ratio"] / tokens,
                   ratio_max=sums["ratio_max"], ratio_min=sums["ratio_min"],
                   clip_frac_low=sums["clip_low"] / tokens, clip_frac_high=sums["clip_high"] / tokens,
                   train_tokens=totals["tokens"], skipped=(~finite).astype(jnp.int32))
    return new_state, metrics


def make_policy_logp(graphdef) -> Callable:
    """-> jitted `policy_logp(state, batch) -> [A, B, S]`: the trainer's log-probs of a batch's
    targets at its temperature (old_logp recomputed by the trainer instead of the sampler)."""
    def policy_logp(state, batch):
        TRACES["policy_logp"] += 1
        model = nnx.merge(graphdef, state.params, state.buffers)
        micro = {k: v for k, v in batch.items() if k != "temperature"}
        return jax.lax.map(lambda m: token_logp(model, m, batch["temperature"])[0], micro)

    return jax.jit(policy_logp)


def make_grpo_step(graphdef, optimizer: optax.GradientTransformation, config: GrpoConfig,
                   state_shardings=None) -> Callable:
    """-> jitted `step(state, batch, rng[, ref_params]) -> (state, metrics)`, state donated.
    `state_shardings` (the state's own) pins the output state to them, so the second call
    finds the first one's program instead of compiling for new shardings."""
    def step(state, batch, rng, ref_params=None):
        return grpo_step(graphdef, state, batch, rng, optimizer=optimizer, config=config,
                         ref_params=ref_params)

    out_shardings = None if state_shardings is None else (state_shardings, None)
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)
