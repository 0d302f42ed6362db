"""Parity with transformers' Glm4MoeForCausalLM on the committed golden fixtures (made by
tests/fixtures/make_fixtures.py), and with an independent numpy implementation."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from glm_jax import GlmMoeModel, ModelConfig, load_hf, save_hf
from tests import numpy_reference

FIXTURES = sorted(p.parent for p in (Path(__file__).parent / "fixtures").glob("*/golden.npz"))
# More fixture dirs (e.g. from `make_fixtures.py --random-seed N --out DIR`), ':'-separated.
EXTRA = [Path(p) for p in os.environ.get("GLM_JAX_EXTRA_FIXTURES", "").split(":") if p]
TOLERANCE = 1e-4


def test_fixtures_present():
    assert len(FIXTURES) >= 9


@nnx.jit
def _run(model, ids):
    out = model.forward(ids)
    return out.logits, out.hidden, model.mtp_logits(out.hidden[:, :-1], ids[:, 1:])


@pytest.mark.parametrize("fixture", FIXTURES + EXTRA, ids=lambda p: p.name)
def test_logits_match_transformers(fixture):
    golden = np.load(fixture / "golden.npz")
    model = load_hf(fixture)
    logits, hidden, mtp = _run(model, golden["input_ids"].astype(np.int32))
    assert np.abs(np.asarray(logits) - golden["logits"]).max() <= TOLERANCE
    assert np.abs(np.asarray(hidden) - golden["main_hidden_normed"]).max() <= TOLERANCE
    assert np.abs(np.asarray(mtp) - golden["mtp_logits"]).max() <= TOLERANCE


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
