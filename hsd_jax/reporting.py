"""Where a run's numbers go: console lines, progress bars, metrics.jsonl, TensorBoard, PNG plots.

Only process 0 reports (`Reporter(enabled=jax.process_index() == 0)`); every method is a no-op
elsewhere. On resume at step S, rows of metrics.jsonl past S (logged after the last checkpoint
by a run that was killed) are dropped and TensorBoard purges events from S + 1 on, so each step
is recorded exactly once.

TensorBoard events come from tensorboardX's `SummaryWriter`: a maintained writer with no
TensorFlow dependency, which supports `purge_step` for clean resumes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping

import numpy as np

# What a step line shows, in order (everything goes to metrics.jsonl and TensorBoard).
CONSOLE_KEYS = ("reward", "coverage", "loss", "divergence", "kl", "entropy", "credit_mass_w8",
                "response_length", "tokens_per_s")


def is_eval_accuracy(key: str) -> bool:
    """Eval metrics shown in step lines and eval.png: `eval/accuracy` and each set's `eval/<set>/avg@n`
    (the rest of evaluate.py's metrics go to metrics.jsonl and TensorBoard)."""
    return key == "eval/accuracy" or key.startswith("eval/") and key.rsplit("/", 1)[1].startswith("avg@")


def format_value(value: float) -> str:
    """`0.1234567` -> `0.1235`; NaN or inf (a metric undefined on this step) -> `-`."""
    return f"{value:.4g}" if math.isfinite(value) else "-"


def format_duration(seconds: float) -> str:
    """`3725.0` -> `1h02m05s`, `65.2` -> `1m05s`, `4.2` -> `4s`."""
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl file ([] if it does not exist); a torn last line is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: str | os.PathLike, last_step: int) -> list[dict]:
    """Rewrites metrics.jsonl keeping only rows with step <= `last_step`; returns them."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
    return rows


def plot_curves(path: str | os.PathLike, rows: Iterable[Mapping], keys: Iterable[str], title: str) -> bool:
    """PNG of each metric in `keys` against step (one panel each); False if no row has any key."""
    rows = list(rows)
    series = {k: [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return True


def progress_bar(total: int, description: str, initial: int = 0, *, enabled: bool = True):
    """A tqdm bar with ETA on stderr when it is an interactive terminal and `enabled` (process 0)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step", dynamic_ncols=True, leave=False,
                disable=None if enabled else True, file=sys.stderr)


class Reporter:
    """A run's outputs in `workdir`: metrics.jsonl, tensorboard/, curves.png, eval.png, credit_profile.png."""

    def __init__(self, workdir: str, total_steps: int, *, resume_step: int | None = None, enabled: bool = True):
        self.workdir, self.total_steps, self.enabled = workdir, total_steps, enabled
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self.rows: list[dict] = []
        self.profile_total = self.profile_count = self.profile_offsets = None
        self.started = time.perf_counter()
        self.first_step = resume_step or 0
        if not enabled:
            return
        if resume_step is not None:
            self.rows = truncate_metrics(self.metrics_path, resume_step)
        elif os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run (no checkpoint) starts a fresh record
        from tensorboardX import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        # A unique suffix: two writers started within one second would otherwise share a file.
        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge,
                                         filename_suffix=f".{uuid.uuid4().hex[:8]}")
        self.metrics_file = open(self.metrics_path, "a")

    def print(self, message: str) -> None:
        """A line on stdout (process 0), kept clear of any progress bar."""
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    def start_steps(self) -> None:
        """Starts the clock of the step lines' s/step and ETA (call when the RL steps begin)."""
        self.started = time.perf_counter()

    def progress(self, total: int, description: str, initial: int = 0):
        """A tqdm bar with ETA on an interactive terminal (none in log files or on other processes)."""
        return progress_bar(total, description, initial, enabled=self.enabled)

    def log(self, step: int, metrics: Mapping[str, float], *, echo: bool = True) -> None:
        """Appends `{"step": step, **metrics}` to metrics.jsonl and TensorBoard; prints a step line."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        for key, value in row.items():
            if key != "step" and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        if echo:
            self.print(self.step_line(step, row))

    def step_line(self, step: int, row: Mapping[str, float]) -> str:
        """`step 3/20 reward=0.25 ... credit_mass_w8=- | 1.2 s/step, eta 20s` (undefined metrics as `-`)."""
        shown = " ".join(f"{k}={format_value(row[k])}" for k in CONSOLE_KEYS if k in row)
        evals = " ".join(f"{k}={format_value(v)}" for k, v in row.items() if is_eval_accuracy(k))
        done = step - self.first_step
        per_step = (time.perf_counter() - self.started) / max(done, 1)
        timing = f"{per_step:.1f} s/step, eta {format_duration(per_step * max(self.total_steps - step, 0))}" if done > 0 else ""
        return " ".join(p for p in (f"step {step}/{self.total_steps}", shown, evals, f"| {timing}" if timing else "") if p)

    def add_credit_profile(self, profile) -> None:
        """Accumulates one step's `hindsight.CreditProfile` (mean |A_t| at t - tau, with counts)."""
        if not self.enabled:
            return
        total = np.nan_to_num(profile.mean_abs) * profile.count
        if self.profile_total is None:
            self.profile_offsets, self.profile_total, self.profile_count = profile.offsets, total, profile.count.copy()
        else:
            self.profile_total = self.profile_total + total
            self.profile_count = self.profile_count + profile.count

    def plot(self) -> None:
        """Writes curves.png (training metrics), eval.png (held-out accuracy) and credit_profile.png."""
        if not self.enabled:
            return
        plot_curves(os.path.join(self.workdir, "curves.png"), self.rows,
                    ("reward", "coverage", "loss", "kl", "credit_mass_w8", "response_length"), "training")
        eval_keys = sorted({k for r in self.rows for k in r if is_eval_accuracy(k)})
        plot_curves(os.path.join(self.workdir, "eval.png"), self.rows, eval_keys, "held-out evaluation")
        if self.profile_count is not None and self.profile_count.sum() > 0:
            from hsd_jax.hindsight import CreditProfile, plot_credit_profile

            with np.errstate(invalid="ignore"):
                mean = np.where(self.profile_count > 0, self.profile_total / np.maximum(self.profile_count, 1), np.nan)
            plot_credit_profile(os.path.join(self.workdir, "credit_profile.png"),
                                {"failed rollouts with a peer": CreditProfile(self.profile_offsets, mean, self.profile_count)},
                                title=f"Credit |A_t| around the divergence tau (steps {self.first_step + 1}-{self.rows[-1]['step'] if self.rows else 0})")

    def close(self) -> None:
        if self.enabled:
            self.metrics_file.close()
            self.tensorboard.close()
