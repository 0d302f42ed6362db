"""GRPO's objectives against a direct numpy transcription of SPEC.md §4b, over random shapes,
masks (empty rows included), eps_low != eps_high and advantages of both signs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from glm_jax.rl import aggregate_loss, group_advantages, k3_kl, overlong_penalty, token_policy_loss

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
FLOATS = st.floats(-3, 3, width=32)


def np_group_advantages(rewards, g, scale_by_std=True, eps=1e-6):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), g):
        group = np.asarray(rewards[start:start + g], np.float64)
        a = group - group.mean()
        if scale_by_std:
            std = group.std(ddof=1) if g > 1 else 1.0
            a = a / (std + eps)
        out[start:start + g] = a
    return out


def np_token_loss(logp, old, adv, eps_low, eps_high, clip_c):
    adv = adv[:, None] if adv.ndim == 1 else adv
    rho = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * rho, -adv * np.clip(rho, 1 - eps_low, 1 + eps_high))
    if clip_c is not None:
        loss = np.where(adv < 0, np.minimum(loss, -clip_c * adv), loss)
    return loss


def np_aggregate(l, m, mode):
    B, T = l.shape
    if mode == "token-mean":
        return (l * m).sum() / max(m.sum(), 1)
    if mode == "seq-mean-token-mean":
        rows = [(l[b] * m[b]).sum() / m[b].sum() for b in range(B) if m[b].sum() > 0]
        return float(np.mean(rows)) if rows else 0.0
    if mode == "seq-mean-token-sum":
        return float(np.mean([(l[b] * m[b]).sum() for b in range(B)]))
    return (l * m).sum() / (B * T)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 5), st.data(), st.booleans())
def test_group_advantages(groups, g, data, scale):
    rewards = data.draw(hnp.arrays(np.float32, groups * g, elements=st.sampled_from(
        [0.0, 0.5, 1.0, -1.0, 2.0])))
    got = np.asarray(group_advantages(rewards, g, scale_by_std=scale))
    assert got.dtype == np.float32 and got.shape == (groups * g,)
    np.testing.assert_allclose(got, np_group_advantages(rewards, g, scale), rtol=1e-5, atol=1e-5)


def test_group_advantages_known_values_and_errors():
    np.testing.assert_allclose(group_advantages([1, 0, 0, 0], 4),
                               [1.5, -0.5, -0.5, -0.5], rtol=1e-5)  # std(ddof=1) = 0.5
    np.testing.assert_allclose(group_advantages([1, 1, 3, 1], 2), [0, 0, 1 / np.sqrt(2), -1 / np.sqrt(2)],
                               rtol=1e-5)
    assert np.all(np.asarray(group_advantages([2.0, 5.0], 1)) == 0)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(np.zeros(4), 3)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.data(), st.sampled_from([None, 3.0]),
       st.booleans())
def test_token_policy_loss(B, T, data, clip_c, per_token):
    logp = data.draw(hnp.arrays(np.float32, (B, T), elements=FLOATS))
    old = data.draw(hnp.arrays(np.float32, (B, T), elements=FLOATS))
    adv = data.draw(hnp.arrays(np.float32, (B, T) if per_token else (B,),
                               elements=st.floats(-2, 2, width=32)))
    got = np.asarray(token_policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28, clip_c=clip_c))
    np.testing.assert_allclose(got, np_token_loss(logp, old, adv, 0.2, 0.28, clip_c),
                               rtol=1e-5, atol=1e-5)


def test_token_policy_loss_clips_asymmetrically():
    logp = np.log(np.array([[1.5, 0.5]], np.float32))
    zero = np.zeros_like(logp)
    # A > 0: the gain stops at 1 + eps_high; A < 0: at 1 - eps_low
    np.testing.assert_allclose(token_policy_loss(logp, zero, np.array([1.0]), eps_high=0.28),
                               [[-1.28, -0.5]], rtol=1e-6)
    np.testing.assert_allclose(token_policy_loss(logp, zero, np.array([-1.0]), eps_low=0.2),
                               [[1.5, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(token_policy_loss(logp + 2, zero, np.array([-1.0]), clip_c=3.0),
                               [[3.0, 3.0]], rtol=1e-6)  # dual clip caps a negative A's loss


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 7), st.data(), st.sampled_from(
    ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-scale"]))
def test_aggregate_loss(B, T, data, mode):
    l = data.draw(hnp.arrays(np.float32, (B, T), elements=FLOATS))
    m = data.draw(hnp.arrays(np.float32, (B, T), elements=st.sampled_from([0.0, 1.0])))
    if data.draw(st.booleans()):
        m[0] = 0  # an empty row
    got = float(aggregate_loss(l, m, mode))
    assert got == pytest.approx(np_aggregate(l, m, mode), rel=1e-5, abs=1e-5)


def test_aggregate_loss_all_masked_and_bad_mode():
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-scale"):
        assert float(aggregate_loss(np.ones((2, 3)), np.zeros((2, 3)), mode)) == 0.0
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate_loss(np.ones((1, 1)), np.ones((1, 1)), "mean")


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_k3_kl(B, T, data):
    logp = data.draw(hnp.arrays(np.float32, (B, T), elements=FLOATS))
    ref = data.draw(hnp.arrays(np.float32, (B, T), elements=FLOATS))
    delta = ref.astype(np.float64) - logp
    got = np.asarray(k3_kl(logp, ref))
    np.testing.assert_allclose(got, np.exp(delta) - delta - 1, rtol=1e-4, atol=1e-5)
    assert np.all(got >= -1e-6)


@SETTINGS
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 30), st.data())
def test_overlong_penalty(lengths, max_len, data):
    cache = data.draw(st.integers(1, max_len))
    start = max_len - cache
    expected = [0.0 if n <= start else (start - n) / cache if n <= max_len else -1.0
                for n in lengths]
    np.testing.assert_allclose(overlong_penalty(np.array(lengths), max_len=max_len, cache_len=cache),
                               expected, rtol=1e-6, atol=1e-7)


def test_overlong_penalty_rejects_a_bad_cache():
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty([1], max_len=4, cache_len=5)
