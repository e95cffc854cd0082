"""main.py's modes besides training: export, eval and sample, on a trained checkpoint or a HF model.

    --mode=export --export_dir=DIR [--step=N] [--export_dtype=bfloat16]   HF directory (export.py)
    --mode=eval [--step=N]        the eval sets (evaluate.py): a table, <workdir>/eval_<step>.json
    --mode=sample [--prompts_file=F] [--num_samples=N]   decoded responses (and rewards)

Which model (`load`): the checkpoint `--step` of the workdir, else its latest checkpoint, else the
Hugging Face directory `model.path` (to evaluate a base model, point `workdir` at a directory
without checkpoints). Only the params are restored: no optimizer state, no training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from hsd_jax import data, evaluate, export, hindsight, reporting, rewards, rollout, sharding, trainer, validation
from hsd_jax._models import qwen3
from hsd_jax.checkpoint import Checkpointer
from hsd_jax.rewards.code import SandboxLimits


@dataclasses.dataclass
class LoadedModel:
    """A policy to use without training. step: the checkpoint's step, or None for `model.path`."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    tokenizer: Any
    model_cfg: qwen3.Qwen3Config
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int | None
    source: str

    def policy(self) -> rollout.Policy:
        """For sampling: the params in the decode layout (`sampling.decode_layout`), the run's settings."""
        c = self.config
        template = hindsight.encode_template(self.tokenizer, trainer.teacher_template(c))
        params = trainer.decode_params(self.params, c.sampling.decode_layout, self.model_cfg, self.mesh)
        return rollout.Policy(self.graphdef, params, template, self.tokenizer,
                              rollout.sampling_config(c.sampling, self.tokenizer), c.sampling.rows_per_call, self.mesh,
                              c.sampling.engine)

    def scorer(self) -> rewards.Scorer:
        return rewards.Scorer(validation.verifiers(self.config),
                              code_limits=SandboxLimits(allow_same_uid=self.config.data.code_allow_same_uid))


def load(config: ml_collections.ConfigDict, step: int | None = None) -> LoadedModel:
    """The model of checkpoint `step` (default the latest) of the workdir, else `model.path`.
    Raises ConfigError when there is neither (or no checkpoint `step`)."""
    c = validation.resolve(config)
    validation.validate(c, training=False)
    workdir = os.path.abspath(c.workdir)
    mesh = sharding.make_mesh(tuple(c.mesh.shape))
    tokenizer = trainer.load_tokenizer(c, workdir)
    model_cfg = trainer.model_config(c, tokenizer)
    directory = os.path.join(workdir, "checkpoints")
    steps = Checkpointer(directory).all_steps() if os.path.isdir(directory) else []
    if step is not None and step not in steps:
        raise validation.ConfigError(f"--step={step}: no checkpoint {step} in {directory} (saved: {sorted(steps) or 'none'}).")
    step = step if step is not None else max(steps, default=None)
    if step is None:
        if not c.model.path:
            raise validation.ConfigError(f"no checkpoint in {directory} and config.model.path is empty: train first, "
                                         "or set config.workdir to a run or config.model.path to a HF model.")
        graphdef, params = trainer.initial_params(c, model_cfg, mesh)
        return LoadedModel(c, workdir, mesh, tokenizer, model_cfg, graphdef, params, None, c.model.path)
    graphdef, abstract = nnx.split(qwen3.abstract_model(model_cfg))
    shardings = sharding.state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = Checkpointer(directory).restore_params(step, target)
    return LoadedModel(c, workdir, mesh, tokenizer, model_cfg, graphdef, params, step, f"{directory} step {step}")


def run_export(config: ml_collections.ConfigDict, directory: str, step: int | None = None, dtype: str = "bfloat16") -> str:
    """--mode=export: the model (`load`) as a HF directory; returns its path."""
    model = load(config, step)
    rollout_cfg = rollout.sampling_config(model.config.sampling, model.tokenizer)
    path = export.export_policy(model.graphdef, model.params, model.tokenizer, rollout_cfg, directory, dtype)
    _print(f"exported {model.source} to {path} ({dtype})")
    return path


def run_eval(config: ml_collections.ConfigDict, step: int | None = None) -> evaluate.EvalReport:
    """--mode=eval: the eval sets of `data.eval_files` (the toy task's own eval file for toy data),
    a table on stdout and <workdir>/eval_<step>.json (eval_hf.json for `model.path`)."""
    model = load(config, step)
    _, eval_sets = trainer.data_files(model.config, model.workdir)
    if not eval_sets:
        raise validation.ConfigError("config.data.eval_files is empty: give the files to evaluate (FILE[:avg@N|:greedy],...).")
    progress = lambda total, description: reporting.progress_bar(total, description, enabled=jax.process_index() == 0)
    with model.scorer() as scorer:
        report = trainer.evaluate_policy(model.config, eval_sets, model.policy(), scorer, model.step or 0, progress)
    ks = tuple(model.config.train.eval_ks)
    path = os.path.join(model.workdir, f"eval_{'hf' if model.step is None else model.step}.json")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump({"model": model.source, "step": model.step, "ks": list(ks), "metrics": report.metrics,
                       "sets": report.sets}, f, indent=2)
    _print(f"{model.source}\n{evaluate.format_table(report, ks)}\nwritten to {path}")
    return report


def read_prompts(lines: Iterable[str]) -> list[dict]:
    """Rows from JSONL lines (objects with a "question", maybe an "answer" or "tests") or plain
    lines (each a question); blank lines are skipped."""
    rows = []
    for line in (line.strip() for line in lines):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        rows.append(row if isinstance(row, dict) and "question" in row else {"question": line})
    return rows


def run_sample(config: ml_collections.ConfigDict, lines: Iterable[str], step: int | None = None,
               num_samples: int = 1) -> list[list[str]]:
    """--mode=sample: `num_samples` responses per prompt at the configured sampling settings,
    printed with their length and, for rows with an answer (math) or tests (code), their reward.
    Returns the responses per prompt. (Every process samples every prompt; process 0 prints.)"""
    model = load(config, step)
    c = model.config
    rows = read_prompts(lines)
    if not rows:
        raise validation.ConfigError("no prompts: give --prompts_file (JSONL rows or plain lines) or lines on stdin.")
    kind = validation.row_kind(c)
    policy = model.policy()
    cfg = dataclasses.replace(policy.sampling_cfg, n=num_samples)
    key = trainer.step_key(c.seed, trainer.STREAM_SAMPLE, model.step or 0)
    rollouts = policy.sample(rollout.question_tokens(model.tokenizer, rows, kind), key, cfg)
    texts = model.tokenizer.batch_decode(rollout.responses(rollouts), skip_special_tokens=True)
    rewards_ = sample_rewards(model, [_validated(row, kind) for row in rows], texts, np.asarray(rollouts.truncated))
    out = [f"{model.source}: {len(rows)} prompts x {num_samples} (temperature {cfg.temperature}, top_p {cfg.top_p})"]
    for i, row in enumerate(rows):
        out.append(f"=== prompt {i + 1}: {row['question']}")
        for j in range(num_samples):
            b = i * num_samples + j
            reward = "" if np.isnan(rewards_[b]) else f", reward {rewards_[b]:g}"
            cut = ", truncated" if rollouts.truncated[b] else ""
            out.append(f"--- response {j + 1} ({rollouts.lengths[b]} tokens{cut}{reward})\n{texts[b]}")
    _print("\n".join(out))
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(rows))]


def sample_rewards(model: LoadedModel, rows: list[dict | None], texts: list[str], truncated: np.ndarray) -> np.ndarray:
    """Rewards [len(texts)] of the responses (n per row, in order); NaN for rows that are None
    (no answer or tests to check against)."""
    n = len(texts) // len(rows)
    which = [i * n + j for i, row in enumerate(rows) if row is not None for j in range(n)]
    rewards_ = np.full(len(texts), np.nan)
    if which:
        with model.scorer() as scorer:
            rewards_[which] = scorer([rows[b // n] for b in which], [texts[b] for b in which], truncated=truncated[which])[0]
    return rewards_


def _validated(row: dict, kind: str) -> dict | None:
    """The row as the scorer needs it, or None when it carries no answer / tests."""
    try:
        return data.validate_row(row, kind)
    except data.RowError:
        return None


def _print(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def read_lines(prompts_file: str | None) -> list[str]:
    """The lines of `prompts_file`, or of standard input when it is None."""
    if prompts_file is None:
        return sys.stdin.read().splitlines()
    if not os.path.isfile(prompts_file):
        raise validation.ConfigError(f"--prompts_file={prompts_file!r} does not exist.")
    with open(prompts_file) as f:
        return f.read().splitlines()
