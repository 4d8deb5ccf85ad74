"""Sampling rules on hand-made logits."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sampling import Sampler, SamplerConfig, top_ids

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 0.5], np.float32)


def test_greedy_is_argmax():
    assert Sampler(SamplerConfig(temperature=0))(LOGITS) == 1


def test_seed_reproducible_and_top_k_restricts():
    cfg = SamplerConfig(temperature=5.0, top_k=2, top_p=1.0, seed=3)
    a, b = Sampler(cfg), Sampler(cfg)
    draws = [a(LOGITS) for _ in range(200)]
    assert draws == [b(LOGITS) for _ in range(200)]
    assert set(draws) == {1, 2}


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05], np.float32))
    s = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=0.8, seed=0))
    assert {s(logits) for _ in range(300)} == {0, 1}


def test_repeat_penalty_follows_llama_cpp_rule():
    s = Sampler(SamplerConfig(temperature=0, repeat_penalty=2.0))
    assert s(LOGITS, history=[1]) == 2          # 3.0 / 2 = 1.5 < 2.0
    neg = np.array([-1.0, -1.5], np.float32)
    assert s(neg, history=[0]) == 1             # -1.0 * 2 = -2.0 < -1.5


def test_temperature_spreads_choices():
    s = Sampler(SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, seed=1))
    counts = np.bincount([s(LOGITS) for _ in range(2000)], minlength=5) / 2000
    expected = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert np.abs(counts - expected).max() < 0.04


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 300), st.integers(1, 70000), st.integers(0, 2**32 - 1), st.sampled_from(["normal", "peaked", "flat"])
)
def test_top_ids_are_the_k_largest(k, n, seed, shape):
    """The thresholded partition (a few hundred of a vocabulary partitioned) keeps the same k values as a
    partition of all of them: peaked logits (one token far ahead), flat ones (many near-ties), small arrays."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(n).astype(np.float32)
    if shape == "peaked":
        z[rng.integers(n)] += 40
    elif shape == "flat":
        z = np.round(z, 1)
    k = min(k, n)
    got = top_ids(z, k)
    assert len(got) == k == len(np.unique(got))
    np.testing.assert_array_equal(np.sort(z[got]), np.sort(z)[n - k:])
