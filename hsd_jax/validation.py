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

from hsd_jax import evaluate, hindsight, losses, sharding

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
    try:
        eval_files = [s.path for s in evaluate.parse_eval_files(d.eval_files, config.train.eval_samples)]
    except ValueError as error:
        raise ConfigError(f"config.data.eval_files: {error}") from None
    for field, paths in (("train_files", split_files(d.train_files)), ("eval_files", eval_files)):
        for path in paths:
            _need(os.path.isfile(path), f"config.data.{field}: {path!r} does not exist.")


def _check_sampling(config: ml_collections.ConfigDict) -> None:
    s = config.sampling
    _need(s.temperature > 0, f"config.sampling.temperature={s.temperature} must be > 0.")
    _need(0 < s.top_p <= 1, f"config.sampling.top_p={s.top_p} must lie in (0, 1].")
    _need(s.top_k >= 0, f"config.sampling.top_k={s.top_k} must be >= 0 (0 = off).")
    _need(s.max_new_tokens >= 1, f"config.sampling.max_new_tokens={s.max_new_tokens} must be >= 1.")
    _need(s.group_size >= 2, f"config.sampling.group_size={s.group_size} must be >= 2: peers and group advantages need a group.")
    _need(s.decode_layout in ("tensor", "train"), f"config.sampling.decode_layout={s.decode_layout!r}: use 'tensor' or 'train'.")
    _need(s.rows_per_call >= s.group_size,
          f"config.sampling.rows_per_call={s.rows_per_call} must be >= sampling.group_size={s.group_size}.")


def _check_train(config: ml_collections.ConfigDict) -> None:
    c, t, o = config, config.train, config.optimizer
    _need(o.learning_rate > 0, f"config.optimizer.learning_rate={o.learning_rate} must be > 0.")
    _need(o.max_grad_norm > 0, f"config.optimizer.max_grad_norm={o.max_grad_norm} must be > 0.")
    if t.sft_warmup_steps:
        _need(t.sft_learning_rate > 0, f"config.train.sft_learning_rate={t.sft_learning_rate} must be > 0.")
    _need(len(t.eval_ks) > 0 and all(k >= 1 for k in t.eval_ks), f"config.train.eval_ks={tuple(t.eval_ks)}: give k values >= 1.")
    for field in ("checkpoint_every", "log_every", "eval_samples", "max_to_keep", "micro_batch"):
        _need(t[field] >= 1, f"config.train.{field}={t[field]} must be >= 1.")
    for field in ("steps", "eval_every", "sft_warmup_steps"):
        _need(t[field] >= 0, f"config.train.{field}={t[field]} must be >= 0.")
    rollouts = c.data.questions_per_step * c.sampling.group_size
    _need(rollouts % t.micro_batch == 0,
          f"config.train.micro_batch={t.micro_batch} must divide the {rollouts} rollouts of a step "
          "(data.questions_per_step x sampling.group_size).")
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
    _need(not (c.data.kind == "code" and h.context in ("answer", "peer_answer")),
          f"config.hindsight.context={h.context!r} needs reference answers, which code rows do not have; use 'peer' or 'none'.")
    needed = c.data.max_prompt_len + c.sampling.max_new_tokens
    _need(h.context == "none" or h.max_teacher_len >= needed + 64,
          f"config.hindsight.max_teacher_len={h.max_teacher_len} leaves no room for the teacher's context: the question "
          f"and rollout alone may take {needed} tokens; raise it (the recipe uses ~2 x that).")


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
