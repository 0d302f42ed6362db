"""Parity with transformers' Glm4MoeForCausalLM on the committed golden fixtures (made by
tests/fixtures/make_fixtures.py), and with an independent numpy implementation."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, load_hf, save_hf, sharding
from tests import numpy_reference

FIXTURES = sorted(p.parent for p in (Path(__file__).parent / "fixtures").glob("*/golden.npz"))
# More fixture dirs (e.g. from `make_fixtures.py --random-seed N --out DIR`), ':'-separated.
EXTRA = [Path(p) for p in os.environ.get("GLM_JAX_EXTRA_FIXTURES", "").split(":") if p]
TOLERANCE = 1e-4


@nnx.jit
def _run(model, ids):
    out = model.forward(ids)
    return out.logits, out.hidden, model.mtp_logits(out.hidden[:, :-1], ids[:, 1:])


# Checkpoints exactly as transformers' save_pretrained writes them: no MTP layer, although
# config.json still says num_nextn_predict_layers = 1.
HF_SAVED = [p for p in FIXTURES if p.name.startswith("hf_saved")]
WITH_MTP = [p for p in FIXTURES if p not in HF_SAVED]
MESHES = [None, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}]
# bfloat16 weights computed in bfloat16 (8-bit mantissa) over 3 layers, against transformers'
# float32 forward on the same (bf16-valued) weights: measured max 0.04, mean 0.008.
BF16_MAX, BF16_MEAN = 0.1, 0.02


def test_fixtures_present():
    assert len(WITH_MTP) >= 9
    assert {p.name for p in HF_SAVED} == {"hf_saved_f32", "hf_saved_f32_sharded", "hf_saved_bf16",
                                          "hf_saved_bf16_sharded"}


@pytest.mark.parametrize("fixture", WITH_MTP + EXTRA, ids=lambda p: p.name)
def test_logits_match_transformers(fixture):
    golden = np.load(fixture / "golden.npz")
    model = load_hf(fixture)
    logits, hidden, mtp = _run(model, golden["input_ids"].astype(np.int32))
    assert np.abs(np.asarray(logits) - golden["logits"]).max() <= TOLERANCE
    assert np.abs(np.asarray(hidden) - golden["main_hidden_normed"]).max() <= TOLERANCE
    assert np.abs(np.asarray(mtp) - golden["mtp_logits"]).max() <= TOLERANCE


def _load_without_mtp(fixture, **kwargs):
    with pytest.warns(UserWarning, match=f"{fixture}: no MTP layer tensors"):
        model = load_hf(fixture, **kwargs)
    assert model.config.num_nextn_predict_layers == 0 and model.mtp is None
    return model


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "one-device" if m is None else
                         ",".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.parametrize("fixture", HF_SAVED, ids=lambda p: p.name)
def test_transformers_saved_checkpoint_loads_without_mtp(fixture, mesh):
    golden = np.load(fixture / "golden.npz")
    mesh = None if mesh is None else sharding.make_mesh(mesh)
    model = _load_without_mtp(fixture, mesh=mesh)
    ids, expected = golden["input_ids"].astype(np.int32), golden["logits"]
    if mesh is None:
        logits = nnx.jit(lambda m, i: m(i))(model, ids)
    else:  # 8 rows (the golden's 2, four times), one per device
        ids, expected = np.tile(ids, (4, 1)), np.tile(expected, (4, 1, 1))
        with jax.set_mesh(mesh):
            logits = nnx.jit(lambda m, i: m(i))(model, jax.device_put(ids, sharding.batch_sharding(mesh)))
        experts = model.moe_layers.mlp.experts.gate_proj[...]  # [L, E, H, F], E split over expert
        assert experts.sharding.shard_shape(experts.shape)[1] == (
            experts.shape[1] // mesh.shape["expert"])
    assert np.abs(np.asarray(logits) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("fixture", [p for p in HF_SAVED if "bf16" in p.name], ids=lambda p: p.name)
def test_bfloat16_checkpoint_in_bfloat16(fixture):
    golden = np.load(fixture / "golden.npz")
    model = _load_without_mtp(fixture, dtype=jnp.bfloat16)
    assert model.lm_head.kernel[...].dtype == jnp.bfloat16
    logits = nnx.jit(lambda m, i: m(i))(model, golden["input_ids"].astype(np.int32))
    diff = np.abs(np.asarray(logits.astype(jnp.float32)) - golden["logits"])
    assert diff.max() <= BF16_MAX and diff.mean() <= BF16_MEAN


@pytest.mark.parametrize("name", ["glm45_like", "glm46_style_mtp", "grouped_topk"])
def test_mtp_matches_numpy_formula(name):
    """The MTP layer against an independent float64 numpy implementation of SPEC.md §2."""
    fixture = Path(__file__).parent / "fixtures" / name
    golden = np.load(fixture / "golden.npz")
    ids = golden["input_ids"]
    config, weights = numpy_reference.load(fixture)
    hidden = golden["main_hidden_normed"][:, :-1]
    expected = numpy_reference.mtp_logits(config, weights, hidden.astype(np.float64), ids[:, 1:])
    model = load_hf(fixture)
    got = nnx.jit(lambda m, h, i: m.mtp_logits(h, i))(model, hidden, ids[:, 1:].astype(np.int32))
    assert np.abs(np.asarray(got) - expected).max() <= TOLERANCE


def test_tiny_preset_matches_numpy_reference(tmp_path):
    """A config no fixture covers (the tiny preset: 2 groups, top-1 group), saved by save_hf and
    read back by the numpy reference: main logits and MTP logits agree."""
    config = ModelConfig.preset("tiny")
    model = GlmMoeModel(config, rngs=nnx.Rngs(0))
    _randomise(model)
    save_hf(model, tmp_path / "tiny")
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 10), 0, config.vocab_size))
    np_config, weights = numpy_reference.load(tmp_path / "tiny")
    expected_logits, expected_hidden = numpy_reference.forward(np_config, weights, ids)
    expected_mtp = numpy_reference.mtp_logits(np_config, weights, expected_hidden[:, :-1], ids[:, 1:])
    logits, _, mtp = _run(model, ids.astype(np.int32))
    assert np.std(expected_logits) > 0.3  # a real signal, not near-zero outputs
    assert np.abs(np.asarray(logits) - expected_logits).max() <= TOLERANCE
    assert np.abs(np.asarray(mtp) - expected_mtp).max() <= TOLERANCE


def _randomise(model):
    """O(1) activations (1/sqrt(fan-in) weights, norms around 1, a spread-out balance bias), so a
    1e-4 agreement means something."""
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = var[...].shape
        noise = jax.random.normal(next(keys), shape)
        if path[-1] in ("scale",):
            var[...] = 1.0 + 0.1 * noise
        elif path[-1] == "e_score_correction_bias":
            var[...] = 0.1 * noise
        elif path[-1] == "embedding":
            var[...] = noise
        else:
            fan_in = shape[-2] if len(shape) >= 2 else 1
            var[...] = noise / np.sqrt(fan_in) * (3.0 if path[-2] == "gate" else 1.0)
