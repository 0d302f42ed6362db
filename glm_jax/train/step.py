"""The pre-training step: a pure function of (state, batch), jitted with the state donated.

Loss = next-token cross-entropy + mtp_weight * MTP cross-entropy (token after next) +
aux_weight * sequence-wise balance loss. Gradients accumulate over micro-batches (a scan over the
batch's leading axis) and are clipped to the global norm `grad_clip`. A step whose loss or
gradient is not finite, or whose loss spikes above `spike_factor` times its running average,
leaves parameters and optimizer state untouched and is reported as skipped. After the update,
the balance biases move by the step's global expert loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from glm_jax.errors import InputError
from glm_jax.optim.clipping import clip_by_global_norm
from glm_jax.train.balance import bias_update_rate, max_violation, update_router_biases

Batch = dict[str, jax.Array]  # input_ids, target_ids, segment_ids, positions, loss_mask: [A, B, S]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    mtp_weight: float = 0.3
    mtp_weight_after: float = 0.1  # the report lowers the MTP weight later in training
    mtp_weight_switch_step: int | None = None
    aux_weight: float = 1e-4
    bias_rate: float = 1e-3
    bias_stop_step: int | None = None
    spike_factor: float = 3.0  # skip a step whose loss exceeds this multiple of its running mean
    spike_warmup_steps: int = 20  # the running mean needs a few steps before it means anything
    loss_ema_decay: float = 0.9
    # Vocabulary entries per chunk of the chunked cross-entropy (never the full [B, S, V] float32
    # logits, forward or backward, nor a whole gathered head); 0 = project the whole vocabulary.
    loss_chunk: int = 8192
    grad_clip: float = 0.0  # clip the gradients to this global norm (0: never); see clipping.py

    @property
    def uses_mtp(self) -> bool:
        return bool(self.mtp_weight or (self.mtp_weight_switch_step is not None
                                        and self.mtp_weight_after))


NO_MTP_MESSAGE = ("the model has no MTP layer (config.num_nextn_predict_layers == 0, e.g. a "
                  "checkpoint saved by transformers) but the MTP loss weight is {weight}: set "
                  "step.mtp_weight=0 (and step.mtp_weight_after=0)")


class TrainState(struct.PyTreeNode):
    step: jax.Array  # [] int32
    params: nnx.State
    buffers: nnx.State  # non-Param model state: the router balance biases
    opt_state: Any
    loss_ema: jax.Array  # [] float32 running mean of the loss, for the spike guard

    @classmethod
    def create(cls, model: nnx.Module, optimizer: optax.GradientTransformation):
        """-> (graphdef, state). Optimizer state lives beside the params it updates."""
        graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        return graphdef, cls(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                             opt_state=optimizer.init(params), loss_ema=jnp.zeros((), jnp.float32))


def token_cross_entropy(logits, targets, mask):
    """Sum over tokens of -log p(target), weighted by mask. logits [..., V] (any dtype)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(losses * mask)


def vocab_chunks(vocab: int, chunk: int) -> int:
    """How many vocabulary chunks of at most `chunk` entries: the fewest that divide `vocab`
    when one exists below twice the minimum (no padding), else the minimum (the last padded)."""
    least = -(-vocab // chunk)
    return next((n for n in range(least, 2 * least) if vocab % n == 0), least)


def chunked_cross_entropy(hidden, kernel, targets, mask, chunk: int, *, gather=lambda w: w):
    """token_cross_entropy(hidden @ kernel, targets, mask) over vocabulary chunks of at most
    `chunk` entries: an online log-sum-exp (a lax.scan, each chunk's logits rematerialised in
    the backward), so only a [B, S, chunk] float32 block of logits exists at a time. Chunk i
    holds the ids congruent to i modulo the chunk count, so a vocabulary sharded over devices
    stays sharded in every chunk. `gather` is applied to each [H, chunk] slice of the kernel
    before use (e.g. the FSDP all-gather): the whole head is never gathered, and its gradient
    is reduced a chunk at a time, once per step instead of once per position chunk.
    hidden [B, S, H], kernel [H, V], targets and mask [B, S]."""
    h, v = kernel.shape
    n = vocab_chunks(v, chunk)
    width = -(-v // n)
    padded = n * width > v
    kernel = jnp.pad(kernel, [(0, 0), (0, n * width - v)])
    kernel = jnp.moveaxis(kernel.reshape(h, width, n), 2, 0)  # [n, H, width]: id = p * n + i
    ids = jnp.arange(width) * n

    @jax.checkpoint
    def body(carry, xs):
        top, total, picked = carry  # running max, sum of exp(logit - max), the target's logit
        w, i = xs
        logits = (hidden @ gather(w)).astype(jnp.float32)
        if padded:
            logits = jnp.where(ids + i < v, logits, -jnp.inf)
        new_top = jax.lax.stop_gradient(jnp.maximum(top, logits.max(-1)))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[..., None]).sum(-1)
        here = jnp.take_along_axis(logits, (targets // n)[..., None], -1)[..., 0]
        picked = picked + jnp.where(targets % n == i, here, 0.0)
        return (new_top, total, picked), None

    zeros = jnp.zeros(targets.shape, jnp.float32)
    init = (jnp.full(targets.shape, -jnp.inf), zeros, zeros)
    (top, total, picked), _ = jax.lax.scan(body, init, (kernel, jnp.arange(n)))
    return jnp.sum((top + jnp.log(total) - picked) * mask)


def head_cross_entropy(head, hidden, targets, mask, chunk: int):
    """The cross-entropy of head(hidden), `head` a bias-free Linear: vocabulary-chunked unless
    `chunk` is 0. Under FSDP each chunk of the head is gathered in the compute dtype."""
    if not chunk:
        return token_cross_entropy(head(hidden), targets, mask)
    if head.bias is not None:
        raise ValueError("head_cross_entropy: the output head has a bias, which the chunked "
                         "loss does not add; set step.loss_chunk=0")
    return chunked_cross_entropy(hidden.astype(head.dtype), head.cast_kernel(), targets, mask,
                                 chunk, gather=head.gather)


def mtp_targets(batch: Batch):
    """Row t of the MTP head predicts the token after target t: (targets [B, S], mask [B, S]).
    Valid only where t and t+1 both have real targets in the same document."""
    targets = jnp.roll(batch["target_ids"], -1, axis=-1)
    mask = batch["loss_mask"] * jnp.roll(batch["loss_mask"], -1, axis=-1)
    same = batch["segment_ids"] == jnp.roll(batch["segment_ids"], -1, axis=-1)
    mask = mask * same
    return targets, mask.at[..., -1].set(0.0)


def mtp_weight(step, cfg: StepConfig):
    if cfg.mtp_weight_switch_step is None:
        return jnp.float32(cfg.mtp_weight)
    return jnp.where(step < cfg.mtp_weight_switch_step, cfg.mtp_weight, cfg.mtp_weight_after)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    cfg: StepConfig, learning_rate: Callable | float) -> Callable:
    """Returns jitted `train_step(state, batch) -> (state, metrics)`; the state is donated."""

    def micro_loss(params, buffers, micro: Batch, norms, w_mtp, n_micro):
        model = nnx.merge(graphdef, params, buffers)
        out = model.forward(micro["input_ids"], segment_ids=micro["segment_ids"],
                            positions=micro["positions"])
        ce = head_cross_entropy(model.lm_head, out.hidden, micro["target_ids"],
                                micro["loss_mask"], cfg.loss_chunk)
        aux = (jnp.mean(out.moe_stats.seq_aux_loss) if out.moe_stats is not None
               else jnp.float32(0))
        loads = {"moe_layers": out.moe_stats.tokens_per_expert} if out.moe_stats else {}
        mtp = jnp.float32(0.0)
        if model.mtp is None and cfg.uses_mtp:
            raise InputError(NO_MTP_MESSAGE.format(weight=cfg.mtp_weight))
        if model.mtp is not None:
            hidden, stats = model.mtp_hidden(out.hidden, micro["target_ids"],
                                             segment_ids=micro["segment_ids"],
                                             positions=micro["positions"])
            targets, mask = mtp_targets(micro)
            mtp = head_cross_entropy(model.mtp.shared_head.head, hidden, targets, mask,
                                     cfg.loss_chunk)
            loads["mtp"] = stats.tokens_per_expert
        loss = (ce / norms["tokens"] + w_mtp * mtp / norms["mtp_tokens"]
                + cfg.aux_weight * aux / n_micro)
        return loss, dict(ce=ce, mtp=mtp, aux=aux, loads=loads)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        n_micro = batch["input_ids"].shape[0]
        _, mtp_mask = mtp_targets(batch)
        norms = {"tokens": jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0),
                 "mtp_tokens": jnp.maximum(jnp.sum(mtp_mask), 1.0)}
        w_mtp = mtp_weight(state.step, cfg)

        def accumulate(carry, micro):
            grads, sums = carry
            (_, aux), g = grad_fn(state.params, state.buffers, micro, norms, w_mtp, n_micro)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            sums = jax.tree.map(jnp.add, sums, aux)
            return (grads, sums), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        sums0 = dict(ce=jnp.float32(0), mtp=jnp.float32(0), aux=jnp.float32(0),
                     loads=_zero_loads(state.buffers))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        ce = sums["ce"] / norms["tokens"]
        mtp = sums["mtp"] / norms["mtp_tokens"]
        aux = sums["aux"] / n_micro
        loss = ce + w_mtp * mtp + cfg.aux_weight * aux
        grads, grad_norm = clip_by_global_norm(grads, cfg.grad_clip)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        spike = (state.step >= cfg.spike_warmup_steps) & (ce > cfg.spike_factor * state.loss_ema)
        ok = finite & ~spike

        def update(params, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A cond, not a select of new and old values: the update can then run in place
        # (a select keeps the old parameters and optimizer state alive beside the new ones).
        params, opt_state = jax.lax.cond(ok, update, lambda *old: old, state.params,
                                         state.opt_state)
        rate = bias_update_rate(state.step, rate=cfg.bias_rate, stop_step=cfg.bias_stop_step)
        buffers = update_router_biases(state.buffers, sums["loads"], rate * ok)
        ema = jnp.where(state.step == 0, ce,
                        cfg.loss_ema_decay * state.loss_ema + (1 - cfg.loss_ema_decay) * ce)
        new_state = state.replace(
            step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state,
            loss_ema=jnp.where(ok, ema, state.loss_ema))

        lr = learning_rate(state.step) if callable(learning_rate) else learning_rate
        main_loads = sums["loads"].get("moe_layers")
        metrics = dict(loss=loss, ce_loss=ce, mtp_loss=mtp, aux_loss=aux, grad_norm=grad_norm,
                       learning_rate=jnp.asarray(lr, jnp.float32), skipped=(~ok).astype(jnp.int32),
                       tokens=jnp.sum(batch["loss_mask"]))
        if main_loads is not None:
            vio = max_violation(main_loads)
            metrics.update(max_vio=jnp.mean(vio), max_vio_per_layer=vio, expert_load=main_loads)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def _zero_loads(buffers: nnx.State) -> dict[str, jax.Array]:
    """Zero expert-load counters shaped like each stack's balance bias ([L, E] or [E])."""
    return {path[0]: jnp.zeros(var.shape, jnp.int32) for path, var in nnx.to_flat_state(buffers)
            if path[-1] == "e_score_correction_bias"}
