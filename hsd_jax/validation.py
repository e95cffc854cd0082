"""Config resolution and validation: every check runs before a model is built or a step compiles.

`resolve(config)` turns a config as written (the loss preset named by `loss.name`, unset loss
fields, an unset teacher context) into the concrete run config; `validate(config)` checks it
and raises `ConfigError`, whose one-line message names the field, its value and what is
allowed. `main.py` prints that line and exits without a traceback.

The loss preset is data: `config.loss.name` selects `losses.preset(name)`, every loss field left
as `None` takes the preset's value, and a field set in the config file or on the command line
overrides it. So `--config.loss.name=grpo` trains GRPO (with GRPO's teacher context, none), and
a sweep over `loss.name` does what it says.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import jax
import ml_collections

from hsd_jax import data, evaluate, hindsight, losses, rollout, sharding

logger = logging.getLogger(__name__)

DATA_KINDS = ("math", "code", "toy")
# The teacher each loss preset implies (docs/METHOD.md): its privileged context, peer rule and
# whether demonstrations lose their <think> block; a preset not listed has no teacher.
TEACHERS = {
    "hsd": dict(context="peer_answer", peer_rule="uniform", strip_think=False),
    "hsd_grpo": dict(context="peer_answer", peer_rule="uniform", strip_think=False),
    "opsd": dict(context="answer", peer_rule="uniform", strip_think=False),
    "grpo_opsd": dict(context="answer", peer_rule="uniform", strip_think=False),
    "sdpo": dict(context="peer", peer_rule="first", strip_think=True),
    # the teacher of RLSD's token weights sees the reference answer
    "rlsd": dict(context="answer", peer_rule="uniform", strip_think=False),
}
NO_TEACHER = dict(context="none", peer_rule="uniform", strip_think=False)
# Optimizer steps per rollout batch as published (a preset not listed: 1, on-policy): DAPO makes
# 16 minibatch updates of each 512-prompt batch, GSPO splits each batch into 4 minibatches.
MINIBATCHES = {"dapo": 16, "gspo": 4}


class ConfigError(ValueError):
    """A config value that cannot run; the message is one line naming the field and the fix."""


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A concrete copy of `config`: loss fields from `loss.name`'s preset, the teacher context.

    Fields of `config.loss` that are `None` take the preset's value (DAPO's overlong buffer is
    at most a quarter of the response limit: 1024 of 4096 in the recipe); `hindsight.context`
    `hindsight.peer_rule` and `hindsight.strip_think` left `None` take the preset's (`TEACHERS`).
    An unset `train.minibatches_per_step` takes the preset's published count (`MINIBATCHES`),
    lowered to the largest count whose minibatches split into whole micro-batches.
    """
    name = config.loss.name
    _need(name in losses.PRESETS, f"config.loss.name={name!r} is not a loss preset; use one of {', '.join(losses.PRESETS)}.")
    resolved = ml_collections.ConfigDict(config.to_dict())
    overrides = {k: v for k, v in config.loss.items() if k != "name" and v is not None}
    defaults = dataclasses.asdict(losses.preset(name))
    max_length = overrides.get("max_response_length", defaults["max_response_length"])
    defaults["overlong_buffer"] = min(defaults["overlong_buffer"], max_length // 4)
    with resolved.unlocked():
        resolved.loss = ml_collections.ConfigDict({"name": name, **defaults, **overrides})
    for field, value in TEACHERS.get(name, NO_TEACHER).items():
        if resolved.hindsight[field] is None:
            resolved.hindsight[field] = value
    if resolved.train.minibatches_per_step is None:
        micro_batches = resolved.data.questions_per_step * resolved.sampling.group_size // resolved.train.micro_batch
        fitting = [k for k in range(1, MINIBATCHES.get(name, 1) + 1) if micro_batches % k == 0]
        resolved.train.minibatches_per_step = max(fitting or [1])
    return resolved


def loss_config(config: ml_collections.ConfigDict) -> losses.LossConfig:
    """The `LossConfig` of a resolved `config.loss`; its errors name the `config.loss` field."""
    fields = config.loss.to_dict()
    fields.pop("name")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(losses.LossConfig)})
    _need(not unknown, f"config.loss has unknown fields {unknown}; see losses.LossConfig for the fields.")
    try:
        return losses.LossConfig(**fields)
    except ValueError as error:
        raise ConfigError(f"config.loss ({config.loss.name}): {str(error).removeprefix('LossConfig: ')}") from None


def split_files(files: str) -> list[str]:
    """`"a.jsonl,b.parquet"` -> `["a.jsonl", "b.parquet"]` (empty entries dropped)."""
    return [f.strip() for f in files.split(",") if f.strip()]


def row_kind(config: ml_collections.ConfigDict) -> str:
    """The kind of `data.kind`'s rows: the toy task's are math rows."""
    return "math" if config.data.kind == "toy" else config.data.kind


def kind_files(files: str, default_kind: str) -> dict[str, list[str]]:
    """`"a.jsonl,code=b.jsonl"` -> `{default_kind: ["a.jsonl"], "code": ["b.jsonl"]}`: an entry
    prefixed `math=` or `code=` holds rows of that kind, any other `default_kind`'s (kinds in
    order of first appearance)."""
    sources: dict[str, list[str]] = {}
    for entry in split_files(files):
        prefix, sep, path = entry.partition("=")
        kind, path = (prefix.strip(), path.strip()) if sep and prefix.strip() in data.KINDS else (default_kind, entry)
        sources.setdefault(kind, []).append(path)
    return sources


def mixture(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The kinds of rows a run trains on, with their weights per step: `data.mixture` parsed
    (`"math:4,code:1"` -> `{"math": 4.0, "code": 1.0}`, in its order), else `{row_kind: 1.0}`.
    Raises ConfigError naming `config.data.mixture` for a malformed value."""
    text = config.data.mixture
    if not text.strip():
        return {row_kind(config): 1.0}
    weights: dict[str, float] = {}
    for entry in split_files(text):
        kind, sep, weight = (part.strip() for part in entry.partition(":"))
        try:
            value = float(weight) if sep else None
        except ValueError:
            value = None
        _need(value is not None and value > 0 and value != float("inf"),
              f"config.data.mixture={text!r}: {entry!r} is not kind:weight with a positive weight; write e.g. 'math:4,code:1'.")
        _need(kind in data.KINDS, f"config.data.mixture={text!r}: {kind!r} is not a kind of rows; use {' or '.join(data.KINDS)}.")
        _need(kind not in weights, f"config.data.mixture={text!r} names {kind!r} twice; give each kind once.")
        weights[kind] = value
    return weights


def verifiers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The `rewards.Scorer` verifiers of the mixture's kinds (the toy task's math rows: "toy")."""
    return tuple("toy" if config.data.kind == "toy" and kind == "math" else kind for kind in mixture(config))


def check_workdir(workdir: str) -> None:
    """Creates `workdir` and proves it writable by writing and removing a file in it."""
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"config.workdir={workdir!r} is not writable ({error.strerror}); choose a writable directory.") from None


def _check_paths(config: ml_collections.ConfigDict) -> None:
    m, d = config.model, config.data
    if m.path:
        _need(os.path.isfile(os.path.join(m.path, "config.json")),
              f"config.model.path={m.path!r} is not a Hugging Face model directory (no config.json there).")
    if config.tokenizer_path:
        _need(os.path.isdir(config.tokenizer_path),
              f"config.tokenizer_path={config.tokenizer_path!r} is not a directory; point it at a local HF tokenizer.")
    if config.train.init_params:
        _need(os.path.isdir(config.train.init_params),
              f"config.train.init_params={config.train.init_params!r} is not a directory; point it at saved params "
              "(a run's <workdir>/warmup_policy).")
    for paths in kind_files(d.train_files, row_kind(config)).values():
        for path in paths:
            _need(os.path.isfile(path), f"config.data.train_files: {path!r} does not exist.")
    for eval_set in eval_sets(config):
        _need(os.path.isfile(eval_set.path), f"config.data.eval_files: {eval_set.path!r} does not exist.")


def eval_sets(config: ml_collections.ConfigDict) -> list[evaluate.EvalSet]:
    """`data.eval_files` parsed (`evaluate.parse_eval_files`); its errors name the field."""
    try:
        return evaluate.parse_eval_files(config.data.eval_files, config.train.eval_samples, row_kind(config))
    except ValueError as error:
        raise ConfigError(f"config.data.eval_files: {error}") from None


def _check_mixture(config: ml_collections.ConfigDict) -> None:
    """The mixture parses, gives every kind a row of each step, and matches the files' kinds."""
    d, weights = config.data, mixture(config)
    counts = data.mixture_counts(weights, d.questions_per_step)
    for kind, count in counts.items():
        _need(count >= 1, f"config.data.mixture={d.mixture!r} gives {kind} 0 of the {d.questions_per_step} questions "
                          "per step (config.data.questions_per_step); raise its weight or questions_per_step.")
    if d.kind == "toy":  # the toy task writes a file of each kind
        return
    train, evals = kind_files(d.train_files, row_kind(config)), {s.kind for s in eval_sets(config)}
    mix = f"config.data.mixture={d.mixture!r}" if d.mixture.strip() else f"config.data.kind={d.kind!r} (no data.mixture)"
    for kind in weights:
        _need(kind in train, f"config.data.train_files has no {kind} file for {mix}; prefix {kind} files with '{kind}='.")
    for field, sources in (("train_files", train), ("eval_files", evals)):
        for kind in sources:
            _need(kind in weights, f"config.data.{field} has {kind} files but {mix} has no {kind} rows; add {kind} to "
                                   "config.data.mixture (e.g. 'math:4,code:1') or drop those files.")


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    s = config.sampling
    _need(s.temperature > 0, f"config.sampling.temperature={s.temperature} must be > 0.")
    _need(0 < s.top_p <= 1, f"config.sampling.top_p={s.top_p} must lie in (0, 1].")
    _need(s.top_k >= 0, f"config.sampling.top_k={s.top_k} must be >= 0 (0 = off).")
    _need(s.max_new_tokens >= 1, f"config.sampling.max_new_tokens={s.max_new_tokens} must be >= 1.")
    _need(s.group_size >= 2, f"config.sampling.group_size={s.group_size} must be >= 2: peers and group advantages need a group.")
    _need(s.decode_layout in ("tensor", "train"), f"config.sampling.decode_layout={s.decode_layout!r}: use 'tensor' or 'train'.")
    _need(s.engine in rollout.ENGINES,
          f"config.sampling.engine={s.engine!r}: use one of {', '.join(rollout.ENGINES)}.")
    _need(s.engine == "static" or jax.process_count() == 1,
          f"config.sampling.engine={s.engine!r} runs in one process, not {jax.process_count()}: "
          "use 'static' on several hosts.")
    _need(s.rows_per_call >= s.group_size,
          f"config.sampling.rows_per_call={s.rows_per_call} must be >= sampling.group_size={s.group_size}.")


def _check_train(config: ml_collections.ConfigDict) -> None:
    c, t, o = config, config.train, config.optimizer
    _need(o.learning_rate > 0, f"config.optimizer.learning_rate={o.learning_rate} must be > 0.")
    _need(o.max_grad_norm > 0, f"config.optimizer.max_grad_norm={o.max_grad_norm} must be > 0.")
    if t.sft_warmup_steps:
        _need(t.sft_learning_rate > 0, f"config.train.sft_learning_rate={t.sft_learning_rate} must be > 0.")
    _need(len(t.eval_ks) > 0 and all(k >= 1 for k in t.eval_ks), f"config.train.eval_ks={tuple(t.eval_ks)}: give k values >= 1.")
    for field in ("checkpoint_every", "log_every", "eval_samples", "max_to_keep", "micro_batch", "ppo_epochs",
                  "minibatches_per_step"):
        _need(t[field] >= 1, f"config.train.{field}={t[field]} must be >= 1.")
    for field in ("steps", "eval_every", "sft_warmup_steps", "max_refill_batches"):
        _need(t[field] >= 0, f"config.train.{field}={t[field]} must be >= 0.")
    rollouts = c.data.questions_per_step * c.sampling.group_size
    _need(rollouts % t.micro_batch == 0,
          f"config.train.micro_batch={t.micro_batch} must divide the {rollouts} rollouts of a step "
          "(data.questions_per_step x sampling.group_size).")
    _need(rollouts % (t.micro_batch * t.minibatches_per_step) == 0,
          f"config.train.minibatches_per_step={t.minibatches_per_step} minibatches of the {rollouts} rollouts of a "
          f"step do not split into micro-batches of train.micro_batch={t.micro_batch}; choose a count dividing "
          f"{rollouts // t.micro_batch}.")
    _need(c.data.questions_per_step % jax.process_count() == 0,
          f"config.data.questions_per_step={c.data.questions_per_step} must be a multiple of the "
          f"{jax.process_count()} processes.")
    if t.eval_every and c.data.kind != "toy":
        _need(bool(c.data.eval_files), "config.train.eval_every > 0 needs config.data.eval_files (or set eval_every=0).")


def _check_hindsight(config: ml_collections.ConfigDict, loss_cfg: losses.LossConfig) -> None:
    c, h = config, config.hindsight
    _need(h.context in hindsight.CONTEXT_MODES,
          f"config.hindsight.context={h.context!r}: use one of {', '.join(hindsight.CONTEXT_MODES)}.")
    _need(h.peer_rule in hindsight.PEER_RULES,
          f"config.hindsight.peer_rule={h.peer_rule!r}: use one of {', '.join(hindsight.PEER_RULES)}.")
    _need(not (loss_cfg.needs_teacher and h.context == "none"),
          f"config.loss.name={c.loss.name!r} needs a teacher but config.hindsight.context='none'; "
          "set it (e.g. 'peer_answer' for HSD, 'answer' for OPSD).")
    _need(h.max_tests_tokens >= 1, f"config.hindsight.max_tests_tokens={h.max_tests_tokens} must be >= 1.")
    needed = c.data.max_prompt_len + c.sampling.max_new_tokens
    what = "question and rollout"
    if "code" in mixture(c) and h.context in ("answer", "peer_answer"):  # the tests stand in for the answer
        needed, what = needed + h.max_tests_tokens, "question, tests (hindsight.max_tests_tokens) and rollout"
    _need(h.context == "none" or h.max_teacher_len >= needed + 64,
          f"config.hindsight.max_teacher_len={h.max_teacher_len} leaves no room for the teacher's context: the {what} "
          f"alone may take {needed} tokens; raise it (the recipe uses ~2 x that).")


def validate(config: ml_collections.ConfigDict, training: bool = True) -> losses.LossConfig:
    """Checks a resolved config before anything loads or compiles; returns its `LossConfig`.
    `training=False` (main.py's export, eval and sample modes) does not ask for training files.

    Raises ConfigError naming the field, the value and what is allowed.
    """
    c = config
    _need(c.data.kind in DATA_KINDS, f"config.data.kind={c.data.kind!r}: use one of {', '.join(DATA_KINDS)}.")
    _need(bool(c.model.path or c.model.preset or c.model.arch),
          "config.model: set model.path (a local HF Qwen3 directory), model.preset or model.arch.")
    _need(not training or c.data.kind == "toy" or bool(c.data.train_files),
          f"config.data.train_files is empty for data.kind={c.data.kind!r}; give JSONL/Parquet files.")
    _need(c.data.kind == "toy" or bool(c.tokenizer_path or c.model.path),
          "config.tokenizer_path is empty and there is no config.model.path to take the tokenizer from.")
    _check_paths(c)
    _check_mixture(c)
    _check_sampling(c)
    _check_train(c)
    loss_cfg = loss_config(c)
    _check_hindsight(c, loss_cfg)
    try:
        sharding.make_mesh(tuple(c.mesh.shape))
    except ValueError as error:
        raise ConfigError(f"config.mesh.shape={tuple(c.mesh.shape)}: {error}") from None
    check_workdir(os.path.abspath(c.workdir))
    return loss_cfg
