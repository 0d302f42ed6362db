"""Memory plan of a training config on a (virtual) mesh, without any real device memory.

Parameters and optimizer state are counted exactly from their shardings (each device's shard
shape); activations and temporaries come from XLA's memory analysis of the compiled train step
for the config's per-device micro-batch, compiled at the model's full depth (the layers are
scanned, so that costs no more than a shallow copy; extrapolating from shallow copies missed
whatever grows with the stacked parameters, such as the optimizer's temporaries). It compiles
for virtual CPUs, or, with libtpu installed, for the chips of a TPU topology: ahead-of-time
compilation needs no TPU, and the buffers are those the TPU compiler will allocate on the chips
(its own fusion, layouts and scheduling), not XLA:CPU's.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import sharding
from glm_jax.errors import InputError
from glm_jax.model import GlmMoeModel
from glm_jax.train.loop import build_optimizer, step_config
from glm_jax.train.step import TrainState, make_train_step

GiB = 1024 ** 3


def tpu_devices(topology: str) -> list:
    """The chips of a TPU `topology` such as "v5p:4x4x8", from libtpu, on any host: compiling for
    them makes XLA's memory analysis the TPU compiler's own (bfloat16 kept, TPU scheduling)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise InputError(f"--topology={topology} compiles with libtpu, which is not installed: "
                         "pip install -e '.[tpu]'") from e
    from jax.experimental import topologies

    # Compiling touches no chip, so several plans (or tests) may hold libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # libtpu raises its own error types, e.g. for unknown names
        raise InputError(f"--topology={topology}: libtpu gave no devices for it ({e})") from e


def _device_bytes(abstract_state, shardings) -> int:
    total = 0
    for value, spec in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        total += math.prod(spec.shard_shape(value.shape)) * np.dtype(value.dtype).itemsize
    return total


def _abstract(model_cfg):
    """-> graphdef, abstract Param state, abstract non-Param state (the balance biases)."""
    model = nnx.eval_shape(lambda: GlmMoeModel(model_cfg, rngs=nnx.Rngs(0)))
    return nnx.split(model, nnx.Param, ...)


def _step_memory(config, graphdef, params, buffers, opt_state, optimizer, schedule, mesh,
                 rows_per_device: int, micro_batches: int):
    """XLA's memory analysis of one compiled train step (per device), for abstract placed state."""
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, buffers=buffers,
                       opt_state=opt_state, loss_ema=jax.ShapeDtypeStruct((), jnp.float32))
    rows = rows_per_device * math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES, None))
    batch = {k: jax.ShapeDtypeStruct((micro_batches, rows, config.seq_len),
                                     jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=batch_sharding)
             for k in ("input_ids", "target_ids", "segment_ids", "positions", "loss_mask")}
    step = make_train_step(graphdef, optimizer, step_config(config), schedule)
    with jax.set_mesh(mesh):
        try:
            compiled = step.lower(state, batch).compile()
        except jax.errors.JaxRuntimeError as e:  # a TPU compile that does not fit the chip
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            raise InputError(f"the train step does not fit one device: "
                             f"{str(e).splitlines()[0]}") from e
    return compiled.memory_analysis()


def _placed(state, shardings):
    """Abstract variables whose values carry their shardings."""
    return jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state,
        shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract_opt_state(optimizer, params, mesh):
    """The optimizer state's shapes and dtypes, each leaf sharded like its parameter."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_like(
        x, params, replicated)), jax.eval_shape(optimizer.init, params))


def _like(leaf, params, default):
    """Optimizer leaves shaped like a parameter take that parameter's sharding."""
    for p in jax.tree.leaves(params):
        if p.shape == leaf.shape and leaf.ndim:
            return p.sharding
    return default


def memory_plan(config, model_cfg, mesh, *, rows_per_device: int = 1, micro_batches: int = 1,
                activations: bool = True) -> dict:
    """Per-device GiB of parameters, optimizer state and (if `activations`, which compiles the
    step) activations/temporaries; where the compiler reports it (TPU), its peak.
    `micro_batches` > 1 compiles gradient accumulation: its float32 accumulator lives through
    every micro-batch's backward (any count above 1 needs the same memory)."""
    if micro_batches < 1:
        raise InputError(f"micro_batches must be >= 1, got {micro_batches}")
    optimizer, schedule = build_optimizer(config)
    graphdef, params, buffers = _abstract(model_cfg)
    p_shard = sharding.state_shardings(params, mesh)
    param_bytes = _device_bytes(params, p_shard)
    params = _placed(params, p_shard)
    # As the optimizer builds it: Muon's momentum, AdamW's two moments, in their own dtypes.
    opt_state = _abstract_opt_state(optimizer, params, mesh)
    opt_bytes = _device_bytes(opt_state, [x.sharding for x in jax.tree.leaves(opt_state)])
    plan = {"mesh": dict(mesh.shape), "devices": mesh.size, "rows_per_device": rows_per_device,
            "micro_batches": micro_batches, "seq_len": config.seq_len,
            "param_GiB": param_bytes / GiB, "optimizer_GiB": opt_bytes / GiB}
    if not activations:
        return plan
    buffers = _placed(buffers, sharding.state_shardings(buffers, mesh))
    memory = _step_memory(config, graphdef, params, buffers, opt_state, optimizer, schedule, mesh,
                          rows_per_device, micro_batches)
    act = memory.temp_size_in_bytes
    plan.update(activations_GiB=act / GiB, total_GiB=(param_bytes + opt_bytes + act) / GiB)
    # The TPU compiler also reports its peak (arguments included) from its buffer assignment:
    # what the chip must hold. Its `temp_size` counts more than that peak needs. (XLA:CPU
    # reports only its arguments and outputs as the peak.)
    if memory.peak_memory_in_bytes > (memory.argument_size_in_bytes
                                      + memory.output_size_in_bytes):
        plan["peak_GiB"] = memory.peak_memory_in_bytes / GiB
    return plan
