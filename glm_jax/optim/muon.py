"""Muon for every matrix, AdamW for the rest: GLM-4.5's pre-training optimizer (SPEC §3).

For an A x B matrix W with gradient G (Moonlight, "Muon is Scalable for LLM Training"):

    M <- beta * M + G                        momentum, float32 (or stored in bfloat16)
    U  = G + beta * M                        Nesterov (M itself without)
    O  = NS5(U / ||U||_F)                    quintic Newton-Schulz ~ the polar factor of U
    W <- W - lr * (0.2 * sqrt(max(A, B)) * O + wd * W)

`0.2 * sqrt(max(A, B))` gives the update the RMS (~0.2) of an AdamW update, so one learning rate
and one weight decay serve both halves of the model.

Why not `optax.contrib.muon`: it orthogonalises by `vmap` over a reshaped copy, and its Nesterov
momentum is an Adam-style bias-corrected EMA, `beta * M/(1-beta^(t+1)) + (1-beta) * G/(1-beta^t)`.
That points the same way as `G + beta * M` on the first step and once the corrections reach 1,
but mixes G and M differently for the first few hundred steps. Here every leading axis of a
parameter is a batch axis of the matmuls (stacked layers [L, A, B], experts [L, E, A, B] are L*E
separate matrices), and the momentum is Moonlight's. The Newton-Schulz step itself (Frobenius
normalisation, coefficients, transpose when A > B) and the RMS scale match optax's
(`preconditioning="frobenius"`, `consistent_rms=0.2`); tests/test_optim.py checks both.

Sharding. Under FSDP a matrix axis (`embed`) is split over devices, and XLA gathers a matrix
to orthogonalise it. The stacked layers therefore go one at a time (`lax.map` over the leading
axis): a device holds one layer's gathered matrices, never a whole gathered [L, A, B] stack
(105.6 -> 44.9 GiB of temporaries per device for GLM-4.5 at 128 devices; tested). Each layer's
`G + beta * M` is formed inside that loop too, not as a float32 copy of the whole stack (TPU
plan peak 42.7 -> 41.5 GiB, with the clipping done by the train step). A lone
matrix (the output heads, [5120, 151552]) is split along its long side instead
(`split_long_side`; TPU plan 36.9 -> 35.0 GiB). Stacked experts [L, E, A, B] are orthogonalised
per layer, batched over E, so an expert-parallel split of E stays local. `init` uses
`zeros_like`, so called eagerly the momentum inherits each parameter's sharding; under jit give
it `out_shardings` (the parameters'), as for any optax state.

`momentum_dtype=jnp.bfloat16` stores the momentum (and AdamW's first moment) in bfloat16, as
DeepSeek-V3 stores its AdamW moments: half the optimizer state. Each step computes the new
momentum in float32 and stores it rounded; the update reads the stored momentum back (so it
can be written in place of the old one rather than beside it).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from glm_jax.naming import MATRIX_NAMES, path_names

ADAM_NAMES = ("embedding", "bias", "scale")  # word embeddings, biases, RMSNorm weights
MUON_NAMES = MATRIX_NAMES  # Linear kernels, stacked experts
HEAD_PARENTS = ("lm_head", "head")  # parents of the output kernels [H, V]: main model, MTP
NEVER_OPTIMISED = ("e_score_correction_bias",)  # RouterBias: set by loss-free balancing only


class MuonState(NamedTuple):
    momentum: optax.Updates  # momentum_dtype (float32 by default), the parameters' tree and shapes


def newton_schulz(x, *, steps: int = 5, coeffs=(3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                  dtype=jnp.float32):
    """x [..., A, B] -> float32 [..., A, B], each matrix mapped to ~U S' V^T with S' ~ 1.

    The quintic X <- c0 X + (c1 X X^T + c2 (X X^T)^2) X, from X = x / ||x||_F, on the short side:
    when A > B it runs on the transpose, so the Gram matrix is min(A, B) squared."""
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)  # [..., B, A]
    x = x.astype(jnp.float32)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + eps)
    x = x.astype(dtype)
    c0, c1, c2 = coeffs
    for _ in range(steps):  # unrolled: `steps` is small and static
        gram = x @ jnp.swapaxes(x, -1, -2)  # [..., m, m], m = min(A, B)
        x = c0 * x + (c1 * gram + c2 * (gram @ gram)) @ x
    x = x.astype(jnp.float32)
    return jnp.swapaxes(x, -1, -2) if tall else x


def split_long_side(x):
    """x [A, B] under a mesh (`jax.set_mesh`), split along its longer side over every mesh axis
    of size > 1 when their product divides it. Newton-Schulz then forms its Gram matrix from
    local products and one all-reduce of the small m x m result, and no device gathers the
    whole matrix: for GLM-4.5's output head (5120 x 151552) that gather is 2.9 GiB in float32.
    Unchanged without a mesh or when the axes do not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    long = x.ndim - 1 if x.shape[-1] >= x.shape[-2] else x.ndim - 2
    if not axes or x.shape[long] % math.prod(mesh.shape[a] for a in axes):
        return x
    spec = [None] * x.ndim
    spec[long] = axes
    return jax.lax.with_sharding_constraint(x, P(*spec))


def scale_by_muon(beta: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  ns_coeffs=(3.4445, -4.7750, 2.0315), eps: float = 1e-7, ns_dtype=jnp.float32,
                  rms_scale: float = 0.2,
                  momentum_dtype=jnp.float32) -> optax.GradientTransformation:
    """Momentum, Newton-Schulz orthogonalisation of the last two axes, RMS matching.

    Every leaf must have rank >= 2; leading axes are batch axes. Chain with
    `optax.add_decayed_weights` and `optax.scale_by_learning_rate` (as `muon` does)."""

    def init_fn(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros_like(p, dtype=momentum_dtype), params))

    def orthogonalise(g, m):  # g: gradient, m: momentum already updated with g, as stored
        if g.ndim < 2:
            raise ValueError(f"Muon needs matrices (rank >= 2), got a leaf of shape {g.shape}")
        ns = functools.partial(newton_schulz, steps=ns_steps, coeffs=ns_coeffs, eps=eps,
                               dtype=ns_dtype)

        def direction(g, m):  # Newton-Schulz's input: Nesterov's g + beta * M, or M
            m = m.astype(jnp.float32)
            return g.astype(jnp.float32) + beta * m if nesterov else m

        # One stacked layer at a time, its direction formed inside the loop: under FSDP a matrix
        # axis is sharded and XLA gathers what it orthogonalises, so all layers at once would
        # gather the whole parameter. A lone matrix (the output heads) is split along its long
        # side instead.
        if g.ndim > 2:
            o = jax.lax.map(lambda gm: ns(direction(*gm)), (g, m))
        else:
            o = ns(split_long_side(direction(g, m)))
        return (rms_scale * max(g.shape[-2:]) ** 0.5 * o).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del params
        # Stored first, in place of the old momentum (in its dtype), then read by the update.
        momentum = jax.tree.map(
            lambda g, m: (beta * m.astype(jnp.float32) + g.astype(jnp.float32)).astype(
                momentum_dtype), updates, state.momentum)
        return jax.tree.map(orthogonalise, updates, momentum), MuonState(momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def param_labels(params, *, head_with_adam: bool = False):
    """The label tree ("muon" / "adam") of a model's Param state, decided by path names:

    - "adam": leaves named `embedding` (word embeddings), `bias`, `scale` (RMSNorm weights);
    - "muon": leaves named `kernel` (every Linear: attention, dense MLP, shared experts, router,
      MTP eh_proj) and the stacked experts `gate_proj` / `up_proj` / `down_proj`;
    - the output heads (`lm_head.kernel`, `mtp.shared_head.head.kernel`): "adam" when
      `head_with_adam`, else "muon".

    Accepts `nnx.state(model, nnx.Param)` (labels replace the Variables) or the same tree of plain
    arrays (as `nnx.Optimizer` passes at update time). Raises on any other Variable type, on the
    router's `e_score_correction_bias` and on unknown names, so nothing outside the Param state is
    ever optimised by accident."""

    def label(path, leaf):
        names = path_names(path)
        where = ".".join(names)
        if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param):
            raise ValueError(f"{where} is a {type(leaf).__name__}, not an nnx.Param: pass "
                             "nnx.state(model, nnx.Param) to the optimizer")
        if any(n in NEVER_OPTIMISED for n in names):
            raise ValueError(f"{where} is set by loss-free balancing and must not be optimised: "
                             "pass nnx.state(model, nnx.Param) to the optimizer")
        name = names[-1]
        if name in ADAM_NAMES:
            return "adam"
        if name in MUON_NAMES:
            is_head = len(names) > 1 and names[-2] in HEAD_PARENTS
            return "adam" if is_head and head_with_adam else "muon"
        raise ValueError(f"{where}: no optimizer rule for a parameter named {name!r} "
                         f"(known: {ADAM_NAMES + MUON_NAMES})")

    return jax.tree_util.tree_map_with_path(
        label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def muon(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.1, beta: float = 0.95,
         adam_b1: float = 0.9, adam_b2: float = 0.95, adam_eps: float = 1e-8,
         adam_weight_decay: float = 0.1, adam_lr: optax.ScalarOrSchedule | None = None,
         head_with_adam: bool = False, ns_dtype=jnp.float32,
         momentum_dtype=jnp.float32) -> optax.GradientTransformation:
    """GLM-4.5's optimizer for `nnx.state(model, nnx.Param)`: Muon (`scale_by_muon`, then
    decoupled weight decay `- lr * wd * W`) on the matrices, AdamW on embeddings, biases and norm
    scales (see `param_labels`). `learning_rate` (and `adam_lr`, default the same) may be a
    schedule. `momentum_dtype` is that of Muon's momentum and AdamW's first moment."""
    muon_tx = optax.chain(
        scale_by_muon(beta=beta, ns_dtype=ns_dtype, momentum_dtype=momentum_dtype),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_tx = optax.adamw(learning_rate if adam_lr is None else adam_lr, b1=adam_b1, b2=adam_b2,
                          eps=adam_eps, weight_decay=adam_weight_decay, mu_dtype=momentum_dtype)
    return optax.partition({"muon": muon_tx, "adam": adam_tx},
                           functools.partial(param_labels, head_with_adam=head_with_adam))
