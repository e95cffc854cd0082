"""Verifiable rewards for a training step: one batched entry point over the verifiers.

    with Scorer("math") as scorer:              # start once per run: workers take seconds
        rewards, reasons = scorer(rows, completions, truncated=truncated)
    with Scorer(("math", "code")) as scorer:    # mixed batches: each row scored by its kind

`rows` are dataset rows (`hsd_jax.data` examples): "answer" for math rows (verifiers "math" and
"toy"), "tests" (and optionally "fn_name") for code rows. A row's "kind" field ("math" or
"code", set by `hsd_jax.data`) picks its verifier; a row without one takes the scorer's only
verifier. Either one row per completion, or one row per question with its G completions adjacent
(`completions[b * G + g]` is rollout g of row b, the order of `jnp.repeat(prompts, G, axis=0)`).
Truncated completions score 0 with reason "truncated" and are not verified. Reasons are those
of `math.py` / `code.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hsd_jax.rewards.code import CodeVerifier, SandboxLimits
from hsd_jax.rewards.math import MathVerifier, exact_match

KINDS = ("math", "code", "toy")
# The kind of row each verifier reads: the toy task's rows are math rows checked by exact match.
ROW_KIND = {"math": "math", "code": "code", "toy": "math"}


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
    """Batched rewards for rows of one or several kinds, holding the verifiers' workers.

    `kinds`: the verifiers to start, one or a sequence of "math", "code", "toy" (at most one per
    row kind: "math" and "toy" both verify math rows). `num_workers` defaults to all cores.
    "math" uses a `MathVerifier` (completions parsed and checked in workers, per-completion
    deadline `math_timeout_s`), "code" a `CodeVerifier` (limits `code_limits`), "toy" the
    in-process `exact_match` (string comparison after a linear-time extraction; no workers, no
    deadline). Each verifier scores its rows of a batch in one call.
    """

    def __init__(self, kinds: str | Sequence[str], *, num_workers: int | None = None, math_timeout_s: float = 5.0,
                 code_limits: SandboxLimits = SandboxLimits()):
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be one or more of {KINDS}, got {kinds!r}")
        row_kinds = [ROW_KIND[k] for k in kinds]
        if len(set(row_kinds)) < len(row_kinds):
            raise ValueError(f"kinds {kinds!r}: give one verifier per row kind ('math' and 'toy' both verify math rows)")
        self.kinds = kinds
        self._by_row_kind = dict(zip(row_kinds, kinds))
        self._verifiers: dict[str, MathVerifier | CodeVerifier] = {}
        if "math" in kinds:
            self._verifiers["math"] = MathVerifier(num_workers, timeout_s=math_timeout_s)
        if "code" in kinds:
            self._verifiers["code"] = CodeVerifier(num_workers, limits=code_limits)

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
        verifiers = [self._verifier_of(row) for row in rows]
        rewards = np.zeros(len(completions), np.float32)
        reasons = ["truncated"] * len(completions)
        for kind in self.kinds:
            keep = [i for i in np.flatnonzero(~truncated) if verifiers[i] == kind]
            results = self._verify(kind, [rows[i] for i in keep], [completions[i] for i in keep])
            for i, (reward, reason) in zip(keep, results):
                rewards[i], reasons[i] = reward, reason
        return rewards, reasons

    def _verifier_of(self, row: dict) -> str:
        """The verifier of a row: the one for its "kind", or the scorer's only one."""
        if "kind" not in row and len(self.kinds) == 1:
            return self.kinds[0]
        kind = row.get("kind")
        if kind not in self._by_row_kind:
            raise ValueError(f"a row of kind {kind!r} but this scorer verifies {self.kinds} rows; rows of a "
                             f"mixed batch need a 'kind' field in {sorted(self._by_row_kind)} (hsd_jax.data sets it)")
        return self._by_row_kind[kind]

    def _verify(self, kind: str, rows: list[dict], completions: list[str]) -> list[tuple[float, str]]:
        if not completions:
            return []
        if kind == "toy":
            return [exact_match(c, str(a)) for c, a in zip(completions, _field(rows, "answer", kind))]
        if kind == "math":
            return self._verifiers["math"](completions, [str(a) for a in _field(rows, "answer", "math")])
        fn_names = [row.get("fn_name") for row in rows]
        return self._verifiers["code"](completions, _field(rows, "tests", "code"), fn_names)

    def close(self) -> None:
        if "math" in self._verifiers:
            self._verifiers["math"].close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def score(rows: Sequence[dict], completions: Sequence[str], kinds: str | Sequence[str], *,
          truncated: Sequence[bool] | np.ndarray | None = None,
          **scorer_kwargs: Any) -> tuple[np.ndarray, list[str]]:
    """One-shot `Scorer(kinds, **scorer_kwargs)(rows, completions, truncated)`; starts and stops
    the workers, so a training loop should keep a `Scorer` instead."""
    with Scorer(kinds, **scorer_kwargs) as scorer:
        return scorer(rows, completions, truncated)
