"""save_hf / load_hf: round trips, Hub layout, sharding with an index, strict errors, no
half-written output."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import CheckpointError, GlmMoeModel, ModelConfig, load_hf, save_hf
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


def test_load_onto_mesh(saved):
    mesh = jax.make_mesh((1,), ("data",))
    model = load_hf(saved, mesh=mesh)
    assert model.lm_head.kernel[...].sharding.mesh.shape == mesh.shape
