"""Hugging Face GLM-4.5 safetensors checkpoints <-> GlmMoeModel.

The Hub layout: one tensor per expert (`model.layers.N.mlp.experts.M.gate_proj.weight`), torch
`[out, in]` weights, the MTP layer at `model.layers.{num_hidden_layers}.*`, files sharded with a
`model.safetensors.index.json`. Ours: `[in, out]` kernels, experts and layers stacked. Loading
streams tensor by tensor from memory-mapped files straight into each parameter's sharding, so
the checkpoint never sits in host memory twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax import sharding as sharding_lib
from glm_jax.config import ModelConfig
from glm_jax.convert.safetensors_io import SafetensorsFile, write_safetensors
from glm_jax.errors import CheckpointError, ConfigError
from glm_jax.model import GlmMoeModel

INDEX_FILE = "model.safetensors.index.json"
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
               "e_score_correction_bias": "e_score_correction_bias"}
_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")
# Parameters load from float tensors only: an integer or FP8 tensor read as a float one would
# give wrong numbers silently (FP8 checkpoints: load the bf16 one, then infer.quantize_model).
_FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """How one parameter of ours is assembled from Hub tensors."""
    path: tuple[str, ...]  # our flat-state path
    lead: tuple[int, ...]  # stacked axes (layers, experts) in front of each Hub tensor's axes
    key: Callable[[tuple[int, ...]], str]  # index into the stacked axes -> Hub tensor name
    transpose: bool  # Hub stores this tensor transposed ([out, in])

    def keys(self):
        for index in np.ndindex(*self.lead):
            yield self.key(index)


def _tensor_plan(config: ModelConfig, path: tuple[str, ...]) -> _Tensor:
    head, rest = path[0], path[1:]
    k, last = config.first_k_dense_replace, config.num_hidden_layers
    if head == "embed_tokens":
        return _Tensor(path, (), lambda i: "model.embed_tokens.weight", False)
    if head == "norm":
        return _Tensor(path, (), lambda i: "model.norm.weight", False)
    if head == "lm_head":
        return _Tensor(path, (), lambda i: "lm_head.weight", True)
    if head == "dense_layers":
        return _layer_plan(path, rest, (config.first_k_dense_replace,), lambda i: i)
    if head == "moe_layers":
        return _layer_plan(path, rest, (config.num_moe_layers,), lambda i: k + i)
    if head == "mtp":
        rest = rest[1:] if rest[0] == "layer" else rest  # the MTP block shares the layer prefix
        return _layer_plan(path, rest, (), lambda i: last)
    raise AssertionError(f"no Hub name for parameter {'.'.join(path)}")


def _layer_plan(path, rest, lead, layer_of) -> _Tensor:
    """Parameters under `model.layers.N.`; routed experts add an expert axis."""
    if rest[-2:-1] == ("experts",) and rest[-1] in _EXPERT_WEIGHTS:
        stem = ".".join(rest[:-1])
        n_experts = None  # filled from the variable's shape by _with_experts
        return _Tensor(path, lead + (n_experts,), _expert_key(stem, rest[-1], layer_of, lead),
                       True)
    name = ".".join(rest[:-1] + (_LEAF_NAMES[rest[-1]],))
    if lead:
        return _Tensor(path, lead, lambda i: f"model.layers.{layer_of(i[0])}.{name}",
                       rest[-1] == "kernel")
    return _Tensor(path, lead, lambda i: f"model.layers.{layer_of(0)}.{name}", rest[-1] == "kernel")


def _expert_key(stem, weight, layer_of, lead):
    if lead:
        return lambda i: f"model.layers.{layer_of(i[0])}.{stem}.{i[1]}.{weight}.weight"
    return lambda i: f"model.layers.{layer_of(0)}.{stem}.{i[0]}.{weight}.weight"


def _resolve(plan: _Tensor, shape) -> tuple[_Tensor, tuple[int, ...]]:
    """Fills the expert-axis size from the parameter's shape; returns the Hub tensor shape."""
    lead = tuple(shape[i] if n is None else n for i, n in enumerate(plan.lead))
    plan = dataclasses.replace(plan, lead=lead)
    inner = tuple(shape[len(lead):])
    return plan, (inner[::-1] if plan.transpose else inner)


# ---- reading ---------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _shard_names(path: Path) -> list[str]:
    """The safetensors files of a checkpoint: those its index names (each a plain file name
    inside `path`), else every *.safetensors in it."""
    index_path = path / INDEX_FILE
    if not index_path.exists():
        return sorted(p.name for p in path.glob("*.safetensors"))
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: needs a 'weight_map' object of tensor name -> file")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{index_path}: shard {name!r} is not a file name inside the "
                                  "checkpoint directory")
        if not (path / name).is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} does not exist")
    return names


def _open_checkpoint(path: Path) -> dict[str, SafetensorsFile]:
    names = _shard_names(path)
    if not names:
        raise CheckpointError(f"{path}: no *.safetensors files found")
    tensors: dict[str, SafetensorsFile] = {}
    for name in names:
        file = SafetensorsFile(path / name)
        for key in file.keys():
            if key in tensors:
                raise CheckpointError(f"{path}: tensor {key} is in both {tensors[key].path.name} "
                                      f"and {name}")
            tensors[key] = file
    if (path / INDEX_FILE).exists():
        for key, name in _read_json(path / INDEX_FILE)["weight_map"].items():
            if tensors.get(key) is None or tensors[key].path.name != name:
                raise CheckpointError(f"{path / INDEX_FILE}: lists {key} in {name}, which does "
                                      "not hold it")
    return tensors


def _ignorable(key: str, file: SafetensorsFile, config: ModelConfig) -> bool:
    """Hub tensors that carry nothing for us: rotary caches, zero-size shared experts."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    return (config.n_shared_experts == 0 and ".mlp.shared_experts." in key
            and 0 in file.shape(key))


def _mtp_fallbacks(plans, tensors, config: ModelConfig):
    """GLM-4.6-style checkpoints omit the MTP layer's own embedding and output head (it reuses
    the main model's, vLLM issue #25993): read those two from the main tensors instead."""
    last = config.num_hidden_layers
    fallbacks = {f"model.layers.{last}.embed_tokens.weight": "model.embed_tokens.weight",
                 f"model.layers.{last}.shared_head.head.weight": "lm_head.weight"}
    out = []
    for plan, shape in plans:
        key = plan.key(()) if not plan.lead else None
        if key in fallbacks and key not in tensors:
            plan = dataclasses.replace(plan, key=lambda i, k=fallbacks[key]: k)
        out.append((plan, shape))
    return out


def _without_absent_mtp(config: ModelConfig, tensors, path: Path) -> ModelConfig:
    """transformers ignores the MTP layer on load, so checkpoints it saves have none although
    config.json still counts it: with every MTP tensor absent, load the model without it."""
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    if not config.num_nextn_predict_layers or any(k.startswith(mtp_prefix) for k in tensors):
        return config
    warnings.warn(f"{path}: no MTP layer tensors ({mtp_prefix}*) although config.json has "
                  f"num_nextn_predict_layers={config.num_nextn_predict_layers} (as transformers' "
                  "save_pretrained writes it); loading without the MTP layer", stacklevel=3)
    return config.replace(num_nextn_predict_layers=0)


def _check(plans, tensors: dict[str, SafetensorsFile], config: ModelConfig, path: Path):
    expected: dict[str, tuple[int, ...]] = {}
    for plan, shape in plans:
        for key in plan.keys():
            expected[key] = shape
    missing = [k for k in expected if k not in tensors]
    misshaped = [f"{k}: checkpoint {tensors[k].shape(k)}, model expects {expected[k]}"
                 for k in expected if k in tensors and tensors[k].shape(k) != expected[k]]
    unexpected = [k for k in tensors if k not in expected and not _ignorable(k, tensors[k], config)]
    wrong_dtype = [f"{k} in {tensors[k].path.name}: {tensors[k].dtype_name(k)}, expected one of "
                   f"{'/'.join(_FLOAT_DTYPES)}" for k in expected
                   if k in tensors and tensors[k].dtype_name(k) not in _FLOAT_DTYPES]
    if missing or misshaped or unexpected or wrong_dtype:
        lines = [f"{path}: checkpoint does not match its config.json"]
        lines += [f"  missing: {k}" for k in sorted(missing, key=_natural)]
        lines += [f"  unexpected: {k}" for k in sorted(unexpected, key=_natural)]
        lines += [f"  mis-shaped: {m}" for m in sorted(misshaped, key=_natural)]
        lines += [f"  wrong dtype: {m}" for m in sorted(wrong_dtype, key=_natural)]
        raise CheckpointError("\n".join(lines))


def _reader(plan: _Tensor, tensors, dtype) -> Callable:
    """Callback for jax.make_array_from_callback: reads only the requested slice."""
    n_lead = len(plan.lead)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        lead_ranges = [range(*s.indices(n)) for s, n in zip(index[:n_lead], plan.lead)]
        inner = index[n_lead:]
        parts = []
        for lead_index in np.ndindex(*[len(r) for r in lead_ranges]):
            at = tuple(r[i] for r, i in zip(lead_ranges, lead_index))
            key = plan.key(at)
            array = tensors[key].get(key)
            if plan.transpose:
                array = array.T
            parts.append(np.asarray(array[inner], dtype=dtype))
        if not n_lead:
            return parts[0]
        stacked = np.stack(parts)
        return stacked.reshape(tuple(len(r) for r in lead_ranges) + stacked.shape[1:])

    return read


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None
            ) -> GlmMoeModel:
    """Loads a Hugging Face GLM-4.5 checkpoint directory (config.json + safetensors).

    Parameters are stored and computed in `dtype`; the router's balance bias stays float32.
    With `mesh`, each device reads only its own slice of each tensor, straight into the
    parameter's sharding (`glm_jax.sharding.state_shardings`).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    name = jnp.dtype(dtype).name
    hf_config = _read_json(config_file)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    try:
        config = ModelConfig.from_hf(hf_config, param_dtype=name, dtype=name)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: {e if isinstance(e, ConfigError) else repr(e)}"
                              ) from e
    tensors = _open_checkpoint(path)
    config = _without_absent_mtp(config, tensors, path)
    graphdef, abstract_state = nnx.split(
        nnx.eval_shape(lambda: GlmMoeModel(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(abstract_state)
    plans = [_resolve(_tensor_plan(config, tuple(str(p) for p in key)), var.shape)
             for key, var in flat]
    plans = _mtp_fallbacks(plans, tensors, config)
    _check(plans, tensors, config, path)
    if mesh is not None:
        shardings = nnx.to_flat_state(sharding_lib.state_shardings(abstract_state, mesh))
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = [(key, single) for key, _ in flat]
    leaves = []
    for (key, var), (plan, _), (_, sharding) in zip(flat, plans, shardings):
        value = jax.make_array_from_callback(
            var.shape, sharding, _reader(plan, tensors, np.dtype(var.dtype)))
        leaves.append((key, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ---- writing ---------------------------------------------------------------------------------

def save_hf(model: GlmMoeModel, path: str | os.PathLike, *,
            max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Writes `model` as a Hub-layout checkpoint that transformers' Glm4MoeForCausalLM loads.

    Files are written into a temporary directory and moved into place at the end, so an error
    halfway leaves nothing behind. `path` must not exist or be an empty directory.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory")
    config = model.config
    flat = nnx.to_flat_state(nnx.state(model))
    entries: list[tuple[str, tuple[int, ...], np.dtype]] = []
    source: dict[str, tuple[jax.Array, tuple[int, ...], bool]] = {}
    for key, var in flat:
        plan, shape = _resolve(_tensor_plan(config, tuple(str(p) for p in key)), var.shape)
        value = var[...]
        for index in np.ndindex(*plan.lead):
            name = plan.key(index)
            entries.append((name, shape, np.dtype(value.dtype)))
            source[name] = (value, index, plan.transpose)
    if config.n_shared_experts == 0:  # transformers still declares zero-size shared experts
        for name, shape, dtype in _empty_shared_experts(config, np.dtype(config.param_dtype)):
            entries.append((name, shape, dtype))
            source[name] = (np.zeros(shape, dtype), (), False)
    entries.sort(key=lambda e: _natural(e[0]))

    def produce(name):
        value, index, transpose = source[name]
        array = np.asarray(value[index] if index else value)
        return array.T if transpose else array

    shards = _split_shards(entries, max_shard_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the checkpoint gets normal permissions
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = (f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                     else "model.safetensors")
            write_safetensors(tmp / fname, shard, produce)
            weight_map.update({name: fname for name, _, _ in shard})
        if len(shards) > 1:
            total = sum(int(np.prod(s)) * d.itemsize for _, s, d in entries)
            (tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        if path.exists():
            path.rmdir()
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _empty_shared_experts(config: ModelConfig, dtype):
    h = config.hidden_size
    layers = list(range(config.first_k_dense_replace, config.num_hidden_layers))
    layers += [config.num_hidden_layers] * config.num_nextn_predict_layers
    out = []
    for n in layers:
        stem = f"model.layers.{n}.mlp.shared_experts"
        out += [(f"{stem}.gate_proj.weight", (0, h), dtype), (f"{stem}.up_proj.weight", (0, h), dtype),
                (f"{stem}.down_proj.weight", (h, 0), dtype)]
    return out


def _split_shards(entries, max_bytes):
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * entry[2].itemsize
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    return shards + [current] if current else shards


def _natural(name: str):
    """Sort key that orders layer and expert numbers numerically."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
