"""Meshes, logical axis rules and partition specs.

The mesh has four named axes, any of which may have size 1:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters (and optimizer state) sharded along `embed`
  expert  expert parallelism: routed experts split across it; for everything else it is one
          more FSDP axis (non-expert weights shard `embed` over fsdp x expert)
  tensor  tensor parallelism: heads, MLP width, expert width and vocabulary split across it
Every parameter carries `logical_axes` metadata (one name per axis, stacked layer axes excluded);
`RULES` maps those names to mesh axes. A parameter dimension that its mesh axes do not divide
is an error naming parameter, dimension and axes; an activation dimension stays replicated.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glm_jax.errors import InputError
from glm_jax.naming import path_names

AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the axes a batch is split over

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp", "expert")),  # non-expert weights: FSDP over both data-sharded axes
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("mtp_concat", "fsdp"),
    ("head_dim", None),
    ("seq", None),
)


def make_mesh(shape: dict[str, int] | None = None, *, devices: Sequence | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the four axes; `shape` names the sizes of some
    axes, and `data` takes whatever is left, e.g. make_mesh({"expert": 4}) on 8 devices is
    data=2, expert=4."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {})
    unknown = set(shape) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {AXES}")
    fixed = math.prod(v for k, v in shape.items() if k != "data")
    if "data" not in shape:
        if len(devices) % fixed:
            raise ValueError(f"mesh {shape} does not divide {len(devices)} devices")
        shape["data"] = len(devices) // fixed
    sizes = tuple(shape.get(axis, 1) for axis in AXES)
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def logical_spec(names: Iterable[str | None], shape: Sequence[int], mesh: Mesh,
                 rules=RULES, *, parameter: str | None = None) -> P:
    """PartitionSpec for an array of `shape` whose trailing axes carry logical `names`; leading
    extra axes (stacked layers) stay unsharded. Each mesh axis is used at most once.

    An activation dimension that its mesh axes do not divide (a batch of one while decoding)
    stays replicated; for a `parameter` (its name, for the message) that is a mesh that does not
    fit the model, and raises."""
    names = tuple(names)
    lead = len(shape) - len(names)
    table = dict(rules)
    used: set[str] = set()
    spec: list = [None] * lead
    for dim, (name, size) in enumerate(zip(names, shape[lead:]), lead):
        axes = table.get(name)
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        elif axes and parameter is not None:
            raise InputError(
                f"parameter {parameter}: dimension {dim} ({name}, size {size}) does not divide "
                f"over mesh axes {' x '.join(f'{a}={mesh.shape[a]}' for a in axes)} ({ways} "
                "ways): choose axis sizes that divide it")
        else:
            spec.append(None)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES):
    """NamedSharding for every Variable of an (abstract or concrete) nnx.State, from its
    `logical_axes` metadata; variables without metadata are replicated. A mesh axis that does
    not divide the dimension it shards raises, naming parameter, dimension and axis."""
    def sharding(path, variable):
        names = variable.get_metadata().get("logical_axes", ())
        where = ".".join(path_names(path))
        return NamedSharding(mesh, logical_spec(names, variable.shape, mesh, rules,
                                                parameter=where))
    return jax.tree_util.tree_map_with_path(sharding, state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def constrain(x, *names):
    """with_sharding_constraint by logical names, under `jax.set_mesh(mesh)`; a no-op without a
    mesh (single device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def create_sharded(module_factory, mesh: Mesh, rules=RULES):
    """Builds `module_factory()` (e.g. `lambda: GlmMoeModel(config, rngs=nnx.Rngs(0))`) with
    every parameter created directly in its sharding: initialisation runs under jit with
    out_shardings, so no device ever holds a full copy."""
    graphdef, abstract = nnx.split(nnx.eval_shape(module_factory))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(module_factory())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)
