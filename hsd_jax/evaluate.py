"""pass@k / avg@k evaluation (PAPER.md: pass@1 averaged over 16 samples at temperature 1.0)."""

from __future__ import annotations

from math import comb

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one question from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must lie in [1, num_samples={num_samples}].")
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def summarize(rewards: np.ndarray, ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """Metrics of rewards [num_questions, n] in {0, 1}: `avg@n` (= mean pass@1) and `pass@k`."""
    rewards = np.asarray(rewards)
    n = rewards.shape[1]
    correct = (rewards > 0).sum(axis=1)
    metrics = {f"avg@{n}": float(rewards.mean())}
    for k in ks:
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    return metrics
