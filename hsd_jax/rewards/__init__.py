"""Verifiable rewards for a training step: one batched entry point over the verifiers.

    with Scorer("math") as scorer:              # start once per run: workers take seconds
        rewards, reasons = scorer(rows, completions, truncated=truncated)

`rows` are dataset rows (`hsd_jax.data` examples): "answer" for kinds "math" and "toy",
"tests" (and optionally "fn_name") for "code". Either one row per completion, or one row per
question with its G completions adjacent (`completions[b * G + g]` is rollout g of row b, the
order of `jnp.repeat(prompts, G, axis=0)`). Truncated completions score 0 with reason
"truncated" and are not verified. Reasons are those of `math.py` / `code.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hsd_jax.rewards.code import CodeVerifier, SandboxLimits
from hsd_jax.rewards.math import MathVerifier, exact_match

KINDS = ("math", "code", "toy")


def align_rows(rows: Sequence[dict], num_completions: int) -> list[dict]:
    """One row per completion: `rows` as is, or each row repeated G times if there are
    G = num_completions / len(rows) completions per row."""
    if not rows or num_completions % len(rows):
        raise ValueError(f"got {num_completions} completions for {len(rows)} rows; pass one row "
                         "per completion or per group of G adjacent completions")
    group = num_completions // len(rows)
    return [row for row in rows for _ in range(group)]


def _field(rows: Sequence[dict], name: str, kind: str) -> list[Any]:
    missing = [i for i, row in enumerate(rows) if name not in row]
    if missing:
        raise ValueError(f"rows {missing[:5]} have no {name!r} field, which kind {kind!r} "
                         f"needs; load them with hsd_jax.data for kind {kind!r}")
    return [row[name] for row in rows]


class Scorer:
    """Batched rewards for one kind of task ("math", "code" or "toy"), holding its workers.

    `num_workers` defaults to all cores. "math" uses a `MathVerifier` (completions parsed and
    checked in workers, per-completion deadline `math_timeout_s`), "code" a `CodeVerifier`
    (limits `code_limits`), "toy" the in-process `exact_match` (string comparison after a
    linear-time extraction; no workers, no deadline).
    """

    def __init__(self, kind: str, *, num_workers: int | None = None, math_timeout_s: float = 5.0,
                 code_limits: SandboxLimits = SandboxLimits()):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self._verifier: MathVerifier | CodeVerifier | None = None
        if kind == "math":
            self._verifier = MathVerifier(num_workers, timeout_s=math_timeout_s)
        elif kind == "code":
            self._verifier = CodeVerifier(num_workers, limits=code_limits)

    def __call__(self, rows: Sequence[dict], completions: Sequence[str],
                 truncated: Sequence[bool] | np.ndarray | None = None
                 ) -> tuple[np.ndarray, list[str]]:
        """Returns rewards float32 [N] in {0, 1} and N reasons for the N completions."""
        rows = align_rows(rows, len(completions))
        truncated = np.zeros(len(completions), bool) if truncated is None else np.asarray(
            truncated, bool)
        if truncated.shape != (len(completions),):
            raise ValueError(f"truncated has shape {truncated.shape}, expected "
                             f"({len(completions)},): one flag per completion")
        keep = np.flatnonzero(~truncated)
        results = self._verify([rows[i] for i in keep], [completions[i] for i in keep])
        rewards = np.zeros(len(completions), np.float32)
        reasons = ["truncated"] * len(completions)
        for i, (reward, reason) in zip(keep, results):
            rewards[i], reasons[i] = reward, reason
        return rewards, reasons

    def _verify(self, rows: list[dict], completions: list[str]) -> list[tuple[float, str]]:
        if not completions:
            return []
        if self.kind == "toy":
            return [exact_match(c, str(a))
                    for c, a in zip(completions, _field(rows, "answer", self.kind))]
        if self.kind == "math":
            return self._verifier(completions, [str(a) for a in _field(rows, "answer", "math")])
        fn_names = [row.get("fn_name") for row in rows]
        return self._verifier(completions, _field(rows, "tests", "code"), fn_names)

    def close(self) -> None:
        if isinstance(self._verifier, MathVerifier):
            self._verifier.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score(rows: Sequence[dict], completions: Sequence[str], kind: str, *,
          truncated: Sequence[bool] | np.ndarray | None = None,
          **scorer_kwargs: Any) -> tuple[np.ndarray, list[str]]:
    """One-shot `Scorer(kind, **scorer_kwargs)(rows, completions, truncated)`; starts and stops
    the workers, so a training loop should keep a `Scorer` instead."""
    with Scorer(kind, **scorer_kwargs) as scorer:
        return scorer(rows, completions, truncated)
