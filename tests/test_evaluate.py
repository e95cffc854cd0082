"""pass@k against a brute-force enumeration of all k-subsets."""
import itertools

import numpy as np
import pytest

from hsd_jax import evaluate


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 6, 2), (8, 1, 8)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected)


def test_summarize_hand_computed():
    rewards = np.array([[1, 0, 0, 1], [0, 0, 0, 0]])
    metrics = evaluate.summarize(rewards, ks=(1, 2))
    assert metrics["avg@4"] == pytest.approx(0.25)
    assert metrics["pass@1"] == pytest.approx(0.25)
    assert metrics["pass@2"] == pytest.approx((1 - 1 / 6) / 2)


def test_bad_k_is_an_error():
    with pytest.raises(ValueError, match="k=5"):
        evaluate.pass_at_k(4, 1, 5)
