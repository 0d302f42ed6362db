"""save_hf / load_hf: round trips, Hub layout, sharding with an index, strict errors, no
half-written output."""

import json
import os
import re
import shutil
import stat
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import CheckpointError, GlmMoeModel, ModelConfig, load_hf, save_hf, sharding
from glm_jax.convert.safetensors_io import SafetensorsFile, write_safetensors

CONFIG = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    model = GlmMoeModel(CONFIG, rngs=nnx.Rngs(0))
    bias = model.moe_layers.mlp.gate.e_score_correction_bias
    bias[...] = jax.random.normal(jax.random.key(1), bias.shape) * 0.1  # non-zero, as trained
    return model


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_hf(model, path, max_shard_bytes=200_000)
    return path


def _assert_same_state(a, b):
    flat_a, flat_b = nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x[...].dtype == y[...].dtype, path
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))


def test_round_trip_is_exact(model, saved):
    _assert_same_state(model, load_hf(saved))


def test_hub_layout(saved):
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 1  # really sharded
    k, last = CONFIG.first_k_dense_replace, CONFIG.num_hidden_layers
    for name in [f"model.layers.{k}.mlp.experts.{CONFIG.n_routed_experts - 1}.gate_proj.weight",
                 f"model.layers.{k}.mlp.gate.e_score_correction_bias",
                 "model.layers.0.mlp.gate_proj.weight", "lm_head.weight", "model.norm.weight",
                 f"model.layers.{last}.eh_proj.weight", f"model.layers.{last}.shared_head.head.weight",
                 f"model.layers.{last}.mlp.experts.0.down_proj.weight"]:
        assert name in weight_map, name
    file = SafetensorsFile(saved / weight_map[f"model.layers.{k}.mlp.experts.0.down_proj.weight"])
    # torch layout: [out, in]
    assert file.shape(f"model.layers.{k}.mlp.experts.0.down_proj.weight") == (
        CONFIG.hidden_size, CONFIG.moe_intermediate_size)
    bias_file = SafetensorsFile(saved / weight_map[f"model.layers.{k}.mlp.gate.e_score_correction_bias"])
    assert bias_file.dtype(f"model.layers.{k}.mlp.gate.e_score_correction_bias") == np.float32
    assert ModelConfig.from_hf(json.loads((saved / "config.json").read_text())) == CONFIG


def test_bfloat16_load_keeps_router_bias_float32(saved):
    model = load_hf(saved, dtype=jnp.bfloat16)
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    assert model.moe_layers.mlp.gate.e_score_correction_bias[...].dtype == jnp.float32
    assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.bfloat16


def _rewrite(src, dst, edit):
    """Copies a single-file checkpoint applying edit(dict name -> array)."""
    dst.mkdir()
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        f = SafetensorsFile(file)
        tensors.update({k: np.array(f.get(k)) for k in f.keys()})
    edit(tensors)
    write_safetensors(dst / "model.safetensors", [(k, v.shape, v.dtype) for k, v in tensors.items()],
                      tensors.__getitem__)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_mismatched_checkpoint_lists_every_problem(saved, tmp_path):
    k = CONFIG.first_k_dense_replace

    def edit(t):
        del t["model.norm.weight"]
        del t[f"model.layers.{k}.mlp.experts.3.up_proj.weight"]
        t["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
        t["lm_head.weight"] = np.zeros((7, CONFIG.hidden_size), np.float32)

    _rewrite(saved, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as error:
        load_hf(tmp_path / "bad")
    message = str(error.value)
    assert "missing: model.norm.weight" in message
    assert f"missing: model.layers.{k}.mlp.experts.3.up_proj.weight" in message
    assert "unexpected: model.layers.0.mlp.extra.weight" in message
    assert "mis-shaped: lm_head.weight: checkpoint (7, 64)" in message


def test_save_refuses_non_empty_directory(model, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_hf(model, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]



def test_failure_midway_leaves_nothing(model, tmp_path, monkeypatch):
    import glm_jax.convert.hf as hf

    calls = []

    def write_then_fail(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_safetensors(path, *args, **kwargs)

    monkeypatch.setattr(hf, "write_safetensors", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "out", max_shard_bytes=200_000)
    assert calls[0].exists() is False  # the first shard was written, then cleaned up
    assert list(tmp_path.iterdir()) == []


def test_no_shared_experts_round_trip(tmp_path):
    config = CONFIG.replace(n_shared_experts=0)
    model = GlmMoeModel(config, rngs=nnx.Rngs(3))
    save_hf(model, tmp_path / "noshared")
    f = SafetensorsFile(tmp_path / "noshared" / "model.safetensors")
    assert f.shape(f"model.layers.{config.first_k_dense_replace}.mlp.shared_experts.gate_proj.weight") == (
        0, config.hidden_size)  # as transformers writes them
    _assert_same_state(model, load_hf(tmp_path / "noshared"))


def test_load_onto_mesh_gives_each_device_its_slice(model, saved):
    mesh = sharding.make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    loaded = load_hf(saved, mesh=mesh)
    expected = sharding.state_shardings(nnx.state(loaded), mesh)
    for (path, var), (_, want) in zip(nnx.to_flat_state(nnx.state(loaded)),
                                      nnx.to_flat_state(expected)):
        assert var[...].sharding.is_equivalent_to(want, var[...].ndim), path
    experts = loaded.moe_layers.mlp.experts.up_proj[...]  # [L, E, H, F]: E, H, F over expert, fsdp, tensor
    original = np.asarray(model.moe_layers.mlp.experts.up_proj[...])
    shapes = set()
    for shard in experts.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), original[shard.index])
        shapes.add(shard.data.shape)
    L, E, H, F = original.shape
    assert shapes == {(L, E // 2, H // 2, F // 2)}
    _assert_same_state(model, jax.device_get(loaded))


# ---- checkpoints without the MTP layer (what transformers' save_pretrained writes) ----------

def _mtp_keys(path):
    prefix = f"model.layers.{CONFIG.num_hidden_layers}."
    return [k for f in path.glob("*.safetensors") for k in SafetensorsFile(f).keys()
            if k.startswith(prefix)]


def test_checkpoint_without_mtp_loads_the_same_model(model, saved, tmp_path):
    mtp = _mtp_keys(saved)
    assert len(mtp) > 20
    _rewrite(saved, tmp_path / "no_mtp", lambda t: [t.pop(k) for k in mtp])
    with pytest.warns(UserWarning, match="no_mtp: no MTP layer tensors"):
        loaded = load_hf(tmp_path / "no_mtp")
    assert loaded.config.num_nextn_predict_layers == 0 and loaded.mtp is None
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, CONFIG.vocab_size)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
    with pytest.raises(ValueError, match="no MTP layer"):
        loaded.mtp_logits(jnp.zeros((1, 3, CONFIG.hidden_size)), ids[:1, :3])
    # Saved again: a config transformers reads as MTP-less, and the same weights.
    save_hf(loaded, tmp_path / "resaved")
    hf_config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert hf_config["num_nextn_predict_layers"] == 0
    assert _mtp_keys(tmp_path / "resaved") == []
    _assert_same_state(loaded, load_hf(tmp_path / "resaved"))


def test_checkpoint_with_part_of_the_mtp_layer_is_refused(saved, tmp_path):
    last = CONFIG.num_hidden_layers
    dropped = [f"model.layers.{last}.eh_proj.weight", f"model.layers.{last}.mlp.experts.2.up_proj.weight"]
    _rewrite(saved, tmp_path / "half_mtp", lambda t: [t.pop(k) for k in dropped])
    with pytest.raises(CheckpointError) as error:
        load_hf(tmp_path / "half_mtp")
    assert all(f"missing: {k}" in str(error.value) for k in dropped)


# ---- untrusted files: every defect named, nothing loaded wrong ------------------------------

def _single_file(saved, tmp_path, name="one"):
    """A single-file copy of `saved` -> (dir, its header dict, data bytes)."""
    _rewrite(saved, tmp_path / name, lambda t: None)
    raw = (tmp_path / name / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return tmp_path / name, json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_raw(directory, header, data, name="model.safetensors"):
    blob = json.dumps(header).encode()
    (directory / name).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("defect, message", [
    ("relabel_i32", "wrong dtype: lm_head.weight in model.safetensors: I32"),
    # U8 is 1 byte per element: the byte range no longer fits the shape
    ("relabel_u8", "model.safetensors: tensor 'lm_head.weight': data_offsets"),
    ("overlap", "model.safetensors: tensor '{second}': data_offsets start at"),
    ("negative", "model.safetensors: tensor '{first}': data_offsets [-8"),
    ("truncated", "model.safetensors: truncated: the header's tensors need"),
    ("empty", "model.safetensors: not a safetensors file (0 bytes"),
    ("huge_header", "model.safetensors: header length 1000000000000 exceeds"),
    ("bad_json", "model.safetensors: header is not valid JSON"),
    ("unknown_dtype", "model.safetensors: tensor '{first}': unknown dtype 'F12'"),
])
def test_corrupt_safetensors_named_and_refused(saved, tmp_path, defect, message):
    directory, header, data = _single_file(saved, tmp_path)
    order = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    first, second = order[0][1], order[1][1]
    path = directory / "model.safetensors"
    if defect == "relabel_i32":
        header["lm_head.weight"]["dtype"] = "I32"
    elif defect == "relabel_u8":
        header["lm_head.weight"]["dtype"] = "U8"
    elif defect == "overlap":
        start, end = header[second]["data_offsets"]
        header[second]["data_offsets"] = [start - 4, end - 4]
    elif defect == "negative":
        start, end = header[first]["data_offsets"]
        header[first]["data_offsets"] = [-8, end - 8 - start]
    elif defect == "unknown_dtype":
        header[first]["dtype"] = "F12"
    if defect == "truncated":
        _write_raw(directory, header, data[:len(data) // 2])
    elif defect == "empty":
        path.write_bytes(b"")
    elif defect == "huge_header":
        path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    elif defect == "bad_json":
        path.write_bytes(struct.pack("<Q", 4) + b"{no}")
    else:
        _write_raw(directory, header, data)
    with pytest.raises(CheckpointError) as error:
        load_hf(directory)
    assert str(directory) in str(error.value)
    assert message.format(first=first, second=second) in str(error.value)


def test_gap_between_tensors_refused(saved, tmp_path):
    directory, header, data = _single_file(saved, tmp_path)
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        entry["data_offsets"] = [o + 4 for o in entry["data_offsets"]]
    _write_raw(directory, header, b"\0" * 4 + data)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    with pytest.raises(CheckpointError, match=f"tensor '{first}'.*leaves a gap"):
        load_hf(directory)


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_json_that_does_not_parse_names_its_file(saved, tmp_path, file):
    shutil.copytree(saved, tmp_path / "ckpt")
    (tmp_path / "ckpt" / file).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "ckpt" / file)) + ".*not valid JSON"):
        load_hf(tmp_path / "ckpt")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors",
                                   "sub/inner.safetensors"])
def test_index_cannot_point_outside_the_checkpoint(saved, tmp_path, shard):
    shutil.copytree(saved, tmp_path / "ckpt")
    index_path = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = next(iter(index["weight_map"]))
    original = index["weight_map"][victim]
    shutil.copy(tmp_path / "ckpt" / original, tmp_path / "outside.safetensors")
    index["weight_map"][victim] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(repr(shard)) + " is not a file name inside"):
        load_hf(tmp_path / "ckpt")


def test_index_naming_a_missing_shard(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    victim = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{victim.name}' does not exist"):
        load_hf(tmp_path / "ckpt")


def test_saved_checkpoint_has_normal_permissions(model, tmp_path):
    umask = os.umask(0o022)
    try:
        save_hf(model, tmp_path / "perm")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "perm").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "perm").iterdir()} == {0o644}
