"""Evaluation: eval sets with their decoding, avg@n / pass@k / length / truncation, per set and overall.

Shared by training's periodic evaluation (`trainer.Run.evaluate`) and `main.py --mode=eval`.

Each entry of `config.data.eval_files` names a file and, optionally, how to decode it (PAPER.md's
tables: avg@16 at temperature 1.0 for math, greedy decoding for HumanEval+):

    "dev.jsonl"              train.eval_samples samples per question at the run's sampling settings
    "aime.jsonl:avg@16"      16 samples per question at temperature 1.0, top_p 1.0, no top-k
    "humaneval.jsonl:greedy" 1 sample per question, temperature 0 (argmax)

An entry prefixed `math=` or `code=` holds rows of that kind (`code=humaneval.jsonl:greedy`), any
other the run's kind (`data.kind`), as in `data.train_files`.

Metrics of a set (keys `eval/<set>/...`, the set named by its file's stem): `avg@n` (the mean
reward of its n samples per question, i.e. mean pass@1), `pass@k` for the configured k <= n
(unbiased estimator), `response_length` (mean generated tokens) and `truncated` (fraction of
samples without an end token). Overall (keys `eval/...`, over the questions of every set):
`accuracy` (the mean over questions of each question's mean reward), `pass@k` for the k every set
supports, `response_length` and `truncated` (means over all samples).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence
from math import comb
from typing import Any

import jax
import numpy as np

from hsd_jax import data

DECODINGS = ("run", "avg", "greedy")  # the run's sampling settings | avg@N at temperature 1 | greedy


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one question from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k={k} must lie in [1, num_samples={num_samples}].")
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def summarize(rewards: np.ndarray, ks: Sequence[int] = (1,), lengths: np.ndarray | None = None,
              truncated: np.ndarray | None = None) -> dict[str, float]:
    """Metrics of rewards [Q, n] in {0, 1}: `avg@n` (= mean pass@1), `pass@k` for each k <= n
    (larger k are left out), and with lengths / truncated [Q, n] their means `response_length`
    and `truncated`."""
    rewards = np.asarray(rewards)
    n = rewards.shape[1]
    correct = (rewards > 0).sum(axis=1)
    metrics = {f"avg@{n}": float(rewards.mean())}
    for k in ks:
        if k <= n:
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k) for c in correct]))
    if lengths is not None:
        metrics["response_length"] = float(np.mean(lengths))
    if truncated is not None:
        metrics["truncated"] = float(np.mean(truncated))
    return metrics


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """One eval file and how to decode it. name: the metric prefix (the file's stem).
    decoding: one of DECODINGS. n: samples per question. kind: its rows' kind (math | code)."""

    path: str
    name: str
    decoding: str
    n: int
    kind: str = "math"

    @property
    def label(self) -> str:
        """How the set is decoded, for tables: "sampling x4", "avg@16 (T=1)", "greedy"."""
        return {"run": f"sampling x{self.n}", "avg": f"avg@{self.n} (T=1)", "greedy": "greedy"}[self.decoding]

    def sampling_config(self, run_sampling):
        """The run's `sampling.SamplingConfig` with this set's decoding and sample count."""
        settings = {"run": {}, "avg": dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
                    "greedy": dict(temperature=0.0)}[self.decoding]
        return dataclasses.replace(run_sampling, n=self.n, **settings)


def parse_eval_files(spec: str, default_samples: int, default_kind: str = "math") -> list[EvalSet]:
    """`"a.jsonl,b.jsonl:avg@16,code=c.jsonl:greedy"` -> EvalSets (module docstring); a file without
    a suffix gets `default_samples` samples at the run's settings, one without a kind prefix
    `default_kind`. Raises ValueError naming the entry."""
    sets = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        prefix, equals, rest = entry.partition("=")
        kind, entry = (prefix.strip(), rest.strip()) if equals and prefix.strip() in data.KINDS else (default_kind, entry)
        path, colon, suffix = entry.rpartition(":")
        if not colon or "/" in suffix or "." in suffix:  # no decoding suffix: ":" belongs to the path
            path, suffix = entry, ""
        if suffix == "greedy":
            decoding, n = "greedy", 1
        elif suffix:
            match = re.fullmatch(r"avg@(\d+)", suffix)
            if not match or int(match.group(1)) < 1:
                raise ValueError(f"{entry!r}: unknown decoding {suffix!r}; use FILE, FILE:avg@N (N >= 1) or FILE:greedy.")
            decoding, n = "avg", int(match.group(1))
        else:
            decoding, n = "run", default_samples
        sets.append(EvalSet(path, os.path.splitext(os.path.basename(path))[0], decoding, n, kind))
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"two eval files share the name {repeated[0]!r} (file stems name the metrics); rename one.")
    return sets


def overall(results: Sequence[dict[str, np.ndarray]], ks: Sequence[int]) -> dict[str, float]:
    """Metrics over the questions of every set: results hold each set's rewards, lengths and
    truncated [Q_s, n_s] (module docstring)."""
    per_question = np.concatenate([r["rewards"].mean(axis=1) for r in results])
    metrics = {"accuracy": float(per_question.mean())}
    for k in ks:
        if all(r["rewards"].shape[1] >= k for r in results):
            passes = [pass_at_k(r["rewards"].shape[1], int(c), k) for r in results for c in (r["rewards"] > 0).sum(axis=1)]
            metrics[f"pass@{k}"] = float(np.mean(passes))
    for key in ("lengths", "truncated"):
        metrics["response_length" if key == "lengths" else key] = float(np.mean(np.concatenate([r[key].ravel() for r in results])))
    return metrics


@dataclasses.dataclass
class EvalReport:
    """metrics: flat `eval/...` keys (module docstring). sets: one dict per set: name, path,
    decoding, n, temperature, top_p, questions and its metrics (without the prefix)."""

    metrics: dict[str, float]
    sets: list[dict[str, Any]]


def evaluate(eval_sets: Sequence[EvalSet], examples_of: Callable[[EvalSet], list[dict]], policy, scorer,
             key: jax.Array, ks: Sequence[int] = (1,), progress: Callable[[int, str], Any] | None = None) -> EvalReport:
    """Samples and scores every set and summarizes it (module docstring).

    examples_of(eval_set): the set's validated examples (of its kind); processes split them (each
    takes its slice, a remainder smaller than the process count is left out). policy: a `rollout.Policy`;
    set i draws with `fold_in(key, i)`. scorer(examples, completions, truncated) -> (rewards, reasons).
    progress(total, description): a context manager with `update(n)` (e.g. a tqdm bar); default none shown.
    """
    from tqdm import tqdm

    from hsd_jax import rollout, sharding

    progress = progress or (lambda total, description: tqdm(total=total, disable=True))

    metrics, rows, results = {}, [], []
    for i, eval_set in enumerate(eval_sets):
        examples = examples_of(eval_set)
        per_process = len(examples) // jax.process_count()
        examples = examples[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
        cfg = eval_set.sampling_config(policy.sampling_cfg)
        questions = rollout.question_tokens(policy.tokenizer, examples, eval_set.kind)
        with progress(len(questions), f"eval {eval_set.name}") as bar:
            rollouts = policy.sample(questions, jax.random.fold_in(key, i), cfg, progress=bar.update)
        rewards, _ = rollout.score(scorer, policy.tokenizer, examples, rollouts)
        every = sharding.gather_rows(dict(rewards=rewards, lengths=np.asarray(rollouts.lengths),
                                          truncated=np.asarray(rollouts.truncated)))
        result = {k: v.reshape(-1, eval_set.n) for k, v in every.items()}
        set_metrics = summarize(result["rewards"], ks, result["lengths"], result["truncated"])
        metrics.update({f"eval/{eval_set.name}/{k}": v for k, v in set_metrics.items()})
        rows.append(dict(name=eval_set.name, path=eval_set.path, decoding=eval_set.label, n=eval_set.n,
                         temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                         questions=len(result["rewards"]), metrics=set_metrics))
        results.append(result)
    if results:
        metrics.update({f"eval/{k}": v for k, v in overall(results, ks).items()})
    return EvalReport(metrics, rows)


def format_table(report: EvalReport, ks: Sequence[int]) -> str:
    """The report as an aligned text table: one row per set, then "overall" ("-": not defined)."""
    def cells(metrics: dict[str, float], accuracy_key: str) -> list[str]:
        number = lambda key, digits=4: f"{metrics[key]:.{digits}f}" if key in metrics else "-"
        return [number(accuracy_key), *[number(f"pass@{k}") for k in ks], number("response_length", 1), number("truncated")]

    header = ["set", "decoding", "questions", "accuracy", *[f"pass@{k}" for k in ks], "length", "truncated"]
    lines = [[r["name"], r["decoding"], str(r["questions"]), *cells(r["metrics"], f"avg@{r['n']}")] for r in report.sets]
    totals = {k.removeprefix("eval/"): v for k, v in report.metrics.items() if k.count("/") == 1}
    lines.append(["overall", "", str(sum(r["questions"] for r in report.sets)), *cells(totals, "accuracy")])
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    render = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, lines)])
