"""GRPO, DAPO, OPSD, SDPO and HSD side by side on the toy task, from one warm-up per seed.

    python benchmarks/toy_compare.py                                  # 5 methods x 3 seeds
    python benchmarks/toy_compare.py --methods hsd,grpo --seeds 0 --steps 10   # a quick look

Per seed, one `python main.py` on configs/tiny.py with `train.steps=0` runs the supervised warm-up
and evaluates the warmed-up policy; every method's run then starts from that policy
(`train.init_params`) and makes the same number of RL steps with the same questions per step and
group size (configs/tiny.py's). Runs go `--jobs` at a time, each a process of its own.

Prints, and writes to <out>/toy_compare.md with the learning curves in <out>/toy_compare.png:
held-out accuracy at the start of RL and at the end (mean and spread over seeds); the share of
|credit| within |t - tau| <= w of the divergence point for the methods with a teacher, next to the
paper's (HSD vs OPSD); measured coverage (failed rollouts with a successful peer) next to
f(p, G) at the measured success rate. The machine's load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import machine  # noqa: E402
from hsd_jax import reporting  # noqa: E402

WINDOWS = (2, 4, 8, 16, 32)
# PAPER.md: share of |A_t| within |t - tau| <= w over failed rollouts with a peer.
PAPER_CREDIT = {"hsd": (23, 39, 55, 76, 93), "opsd": (7, 13, 19, 36, 64)}


def main_py(config: str, workdir: str, seed: int, flags: list[str], log_path: str) -> None:
    """One `python main.py` run; raises with the tail of its log if it fails."""
    command = [sys.executable, "main.py", "--config", config, f"--config.seed={seed}", f"--config.workdir={workdir}",
               *flags]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        status = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if status:
        with open(log_path) as log:
            raise RuntimeError(f"{' '.join(command)} exited {status}:\n{log.read()[-3000:]}")


def eval_accuracy(row: dict) -> float | None:
    """The overall held-out accuracy (mean reward over the eval samples) of a metrics row, if any."""
    return row.get("eval/accuracy")


def curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, held-out accuracy) of a run's evaluations."""
    points = [(r["step"], eval_accuracy(r)) for r in rows if eval_accuracy(r) is not None]
    steps, accuracy = zip(*points)
    return np.array(steps), np.array(accuracy)


def step_mean(rows: list[dict], key: str) -> float:
    """Mean of `key` over a run's RL steps (NaN entries and missing ones left out)."""
    values = np.array([r[key] for r in rows if r.get("step", 0) > 0 and r.get(key) is not None], float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def spread(values: list[float]) -> str:
    """`mean ± std` in percentage points."""
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def table(results: dict[str, list[list[dict]]]) -> str:
    """The markdown tables of the comparison; results[method] = one metrics list per seed."""
    lines = ["| method | held-out acc. start of RL (%) | end (%) | change (points) | reward, first / last 5 steps "
             "| coverage measured | f(p, G) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for method, runs in results.items():
        start = [curve(rows)[1][0] for rows in runs]
        end = [curve(rows)[1][-1] for rows in runs]
        rewards = [[r["reward"] for r in rows if "reward" in r] for rows in runs]
        first, last = np.mean([np.mean(r[:5]) for r in rewards]), np.mean([np.mean(r[-5:]) for r in rewards])
        change = 100 * (np.array(end) - np.array(start))
        lines.append(f"| {method} | {spread(start)} | {spread(end)} | {change.mean():+.1f} ± {change.std():.1f} "
                     f"| {first:.3f} / {last:.3f} | {np.mean([step_mean(r, 'coverage') for r in runs]):.3f} "
                     f"| {np.mean([step_mean(r, 'coverage_formula') for r in runs]):.3f} |")
    steps = curve(next(iter(results.values()))[0])[0]
    lines += ["", "Held-out accuracy at each evaluation, mean over seeds (%):", "",
              "| method | " + " | ".join(f"step {step}" for step in steps) + " |", "|---|" + "---:|" * len(steps)]
    for method, runs in results.items():
        accuracy = 100 * np.mean([curve(rows)[1] for rows in runs], axis=0)
        lines.append(f"| {method} | " + " | ".join(f"{a:.1f}" for a in accuracy) + " |")
    lines += ["", "Share of |credit| within |t - tau| <= w (failed rollouts with a successful peer), mean over steps "
              "and seeds, % (paper in brackets):", "",
              "| method | " + " | ".join(f"w={w}" for w in WINDOWS) + " |", "|---|" + "---:|" * len(WINDOWS)]
    for method, runs in results.items():
        shares = [np.mean([step_mean(r, f"credit_mass_w{w}") for r in runs]) for w in WINDOWS]
        if np.isnan(shares).all():
            continue  # no teacher pass, no credit
        paper = PAPER_CREDIT.get(method)
        cells = [f"{100 * s:.0f}" + (f" ({paper[i]})" if paper else "") for i, s in enumerate(shares)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: str) -> None:
    """Held-out accuracy against RL step: the mean over seeds, shaded between the seeds' min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in results.items():
        steps = curve(runs[0])[0]
        accuracy = np.array([curve(rows)[1] for rows in runs])
        ax.plot(steps, 100 * accuracy.mean(0), marker="o", label=method)
        ax.fill_between(steps, 100 * accuracy.min(0), 100 * accuracy.max(0), alpha=0.15)
    ax.set(xlabel="RL step", ylabel="held-out accuracy (%)", title=f"toy task, {len(runs)} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="grpo,dapo,opsd,sdpo,hsd")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: configs/tiny.py's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "toy_compare"))
    parser.add_argument("--flag", action="append", default=[], help="extra main.py flag for every run, repeatable")
    args = parser.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    flags = [*args.flag, "--config.train.export_at_end=False"]
    if args.steps is not None:
        flags.append(f"--config.train.steps={args.steps}")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    print(f"toy_compare: {methods} x seeds {seeds}", flush=True)

    def warm_up(seed: int) -> None:
        workdir = os.path.join(args.out, f"seed{seed}", "warmup")
        main_py("configs/tiny.py", workdir, seed, [*args.flag, "--config.train.steps=0"], workdir + ".log")
        print(f"  seed {seed}: warm-up done ({time.perf_counter() - start:.0f} s)", flush=True)

    def rl(method: str, seed: int) -> list[dict]:
        workdir = os.path.join(args.out, f"seed{seed}", method)
        warm = os.path.join(args.out, f"seed{seed}", "warmup", "warmup_policy")
        main_py(f"configs/tiny.py:{method}", workdir, seed,
                [*flags, "--config.train.sft_warmup_steps=0", f"--config.train.init_params={warm}"], workdir + ".log")
        print(f"  seed {seed}: {method} done ({time.perf_counter() - start:.0f} s)", flush=True)
        return reporting.read_metrics(os.path.join(workdir, "metrics.jsonl"))

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(warm_up, seeds))
        runs = {(m, s): pool.submit(rl, m, s) for m in methods for s in seeds}
        results = {m: [runs[m, s].result() for s in seeds] for m in methods}
    minutes = (time.perf_counter() - start) / 60
    report = (f"{table(results)}\n\n{len(methods)} methods x {len(seeds)} seeds in {minutes:.1f} min, {args.jobs} "
              f"runs at a time; machine at end: {machine.load()}.")
    print(report)
    with open(os.path.join(args.out, "toy_compare.md"), "w") as f:
        f.write(report + "\n")
    plot(results, os.path.join(args.out, "toy_compare.png"))
    print(f"wrote {args.out}/toy_compare.md and toy_compare.png")


if __name__ == "__main__":
    with machine.reporting_load():
        main()
