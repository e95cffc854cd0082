"""Every config file and loss variant resolves and validates; bad settings fail before any model setup."""
import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from hsd_jax import losses, validation

ROOT = Path(__file__).resolve().parents[1]


def config_of(module="tiny", variant=None, workdir=None, **overrides):
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    if workdir is not None:
        config.workdir = str(workdir)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


MODULES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "base"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random HF checkpoint with a tokenizer beside it, and a math data file."""
    from hsd_jax import data
    from tests.hf_reference import make_checkpoint

    path = tmp_path_factory.mktemp("tiny_qwen3")
    make_checkpoint(path, num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    data.build_toy_tokenizer(str(path))
    return dict(model__path=str(path), data__train_files=str(ROOT / "examples" / "math.jsonl"))


def shipped_config(module, variant, workdir, tiny_model):
    """A shipped config on the tiny checkpoint, with only its sizes shrunk."""
    overrides = dict(tiny_model, data__max_prompt_len=96, sampling__max_new_tokens=64, hindsight__max_teacher_len=256,
                     hindsight__max_tests_tokens=32, data__questions_per_step=2, train__micro_batch=8,
                     sampling__rows_per_call=16)
    kind = importlib.import_module(f"configs.{module}").get_config(variant).data.kind
    if kind == "toy":
        overrides.pop("data__train_files")  # the toy task writes its own
    else:
        overrides["data__train_files"] = str(ROOT / "examples" / f"{kind}.jsonl")
    return config_of(module, variant, workdir, **overrides)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("variant", [None, *losses.PRESETS])
def test_configs_and_variants_resolve_to_their_preset(module, variant, tmp_path, tiny_model):
    config = validation.resolve(shipped_config(module, variant, tmp_path, tiny_model))
    name = variant or "hsd"
    assert config.loss.name == name
    loss_cfg = validation.validate(config)
    limit = config.sampling.max_new_tokens
    fields = dataclasses.asdict(losses.preset(name))
    fields.update(max_response_length=limit, temperature=config.sampling.temperature,
                  overlong_buffer=min(fields["overlong_buffer"], limit // 4))
    assert loss_cfg == losses.LossConfig(**fields)
    teacher_context = {"hsd": "peer_answer", "hsd_grpo": "peer_answer", "opsd": "answer", "grpo_opsd": "answer", "sdpo": "peer", "rlsd": "answer"}
    assert config.hindsight.context == teacher_context.get(name, "none")


@pytest.mark.parametrize("module", MODULES)
def test_shipped_configs_build_the_model_of_model_path(module, tmp_path, tiny_model):
    """model.path wins over the preset the 8B/32B configs name (which then only documents)."""
    import jax

    from hsd_jax import sharding, trainer
    from models import hf

    config = validation.resolve(shipped_config(module, None, tmp_path, tiny_model))
    validation.validate(config)
    model_cfg = trainer.model_config(config, hf.load_tokenizer(config.model.path))
    assert (model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size) == (48, 2, 97)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    _, params = trainer.initial_params(config, model_cfg, mesh)
    assert sum(x.size for x in jax.tree.leaves(params)) == 97 * 48 * 2 + 2 * (48 * 8 * 8 + 2 * 48 * 4 * 8 + 8 * 8 * 48
                                                                           + 3 * 48 * 80 + 2 * 48 + 2 * 8) + 48
    assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["grpo", "opsd", "dapo"])
def test_loss_name_override_selects_the_preset_and_its_teacher(name, tmp_path):
    config = config_of("tiny", None, tmp_path)  # built as HSD
    config.loss.name = name
    resolved = validation.resolve(config)
    loss_cfg = validation.validate(resolved)
    assert (loss_cfg.w_pg, loss_cfg.w_sd) == (losses.preset(name).w_pg, losses.preset(name).w_sd)
    assert loss_cfg.divergence == losses.preset(name).divergence
    assert resolved.hindsight.context == {"grpo": "none", "opsd": "answer", "dapo": "none"}[name]
    if name == "dapo":
        assert loss_cfg.overlong_buffer == config.sampling.max_new_tokens // 4 and loss_cfg.eps_high == 0.28


def test_explicit_fields_override_the_preset(tmp_path):
    config = config_of("qwen3_8b", "grpo", tmp_path)
    config.loss.beta = 1e-4
    config.hindsight.context = "answer"
    resolved = validation.resolve(config)
    assert validation.loss_config(resolved).beta == 1e-4 and validation.loss_config(resolved).w_pg == 1.0
    assert resolved.hindsight.context == "answer"
    assert validation.resolve(resolved).to_dict() == resolved.to_dict()  # idempotent


@pytest.mark.parametrize("module, name, minibatches", [
    ("qwen3_8b", "dapo", 16), ("qwen3_8b", "gspo", 4), ("qwen3_8b", "grpo", 1), ("qwen3_8b", "hsd", 1),
    ("tiny", "gspo", 1),  # 32 rollouts in micro-batches of 32: one minibatch is all that splits
    ("tiny", "dapo", 1),
])
def test_minibatches_per_step_default_to_the_published_count_that_fits(module, name, minibatches, tmp_path):
    resolved = validation.resolve(config_of(module, name, tmp_path))
    assert resolved.train.minibatches_per_step == minibatches
    micro = config_of(module, name, tmp_path, train__micro_batch=4)  # tiny: 8 micro-batches
    expected = {("tiny", "gspo"): 4, ("tiny", "dapo"): 8}.get((module, name), minibatches)
    assert validation.resolve(micro).train.minibatches_per_step == expected
    assert validation.resolve(config_of(module, name, tmp_path, train__minibatches_per_step=2)).train.minibatches_per_step == 2


def rejected(config, *fragments):
    with pytest.raises(validation.ConfigError) as error:
        validation.validate(validation.resolve(config))
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_loss_name_is_rejected_with_the_choices(tmp_path):
    rejected(config_of(workdir=tmp_path, loss__name="bogus"), "config.loss.name='bogus'", "hsd", "grpo", "gspo")


@pytest.mark.parametrize("field,value,fragment", [
    ("optimizer__learning_rate", -1e-5, "config.optimizer.learning_rate"),
    ("optimizer__learning_rate", 0.0, "config.optimizer.learning_rate"),
    ("sampling__top_p", 1.5, "config.sampling.top_p=1.5 must lie in (0, 1]"),
    ("sampling__top_p", 0.0, "config.sampling.top_p"),
    ("sampling__temperature", 0.0, "config.sampling.temperature"),
    ("sampling__group_size", 1, "config.sampling.group_size=1"),
    ("sampling__engine", "paged", "config.sampling.engine='paged': use one of static, continuous"),
    ("train__micro_batch", 7, "config.train.micro_batch=7"),
    ("mesh__shape", (3, 1, 1), "config.mesh.shape"),
    ("model__path", "/nonexistent/qwen", "config.model.path='/nonexistent/qwen'"),
    ("tokenizer_path", "/nonexistent/tok", "config.tokenizer_path='/nonexistent/tok'"),
    ("data__train_files", "/nonexistent/a.jsonl", "config.data.train_files: '/nonexistent/a.jsonl'"),
    ("data__eval_files", "/nonexistent/b.jsonl", "config.data.eval_files: '/nonexistent/b.jsonl'"),
    ("data__eval_files", "/nonexistent/b.jsonl:greedy", "config.data.eval_files: '/nonexistent/b.jsonl' does not"),
    ("data__eval_files", "b.jsonl:best@2", "config.data.eval_files: 'b.jsonl:best@2': unknown decoding 'best@2'"),
    ("train__eval_ks", (1, 0), "config.train.eval_ks=(1, 0)"),
    ("hindsight__peer_rule", "random", "config.hindsight.peer_rule='random'"),
    ("hindsight__context", "everything", "config.hindsight.context='everything'"),
    ("data__kind", "poetry", "config.data.kind='poetry'"),
    ("train__ppo_epochs", 0, "config.train.ppo_epochs=0"),
    ("train__minibatches_per_step", 3, "config.train.minibatches_per_step=3"),  # 32 rollouts, micro-batch 32
])
def test_bad_values_name_the_field(field, value, fragment, tmp_path):
    rejected(config_of(workdir=tmp_path, **{field: value}), fragment)


def test_continuous_engine_is_rejected_on_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    rejected(config_of(workdir=tmp_path, sampling__engine="continuous", data__questions_per_step=4),
             "config.sampling.engine='continuous' runs in one process, not 2")


def test_teacher_losses_need_a_context(tmp_path):
    rejected(config_of(workdir=tmp_path, hindsight__context="none"), "config.hindsight.context='none'")


def test_teacher_length_must_fit_question_and_rollout(tmp_path):
    config = config_of(workdir=tmp_path)
    config.hindsight.max_teacher_len = config.data.max_prompt_len + config.sampling.max_new_tokens
    rejected(config, "config.hindsight.max_teacher_len")


def test_unwritable_workdir_is_rejected(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rejected(config_of(workdir=blocker / "run"), "config.workdir=", "not writable")


def run_main(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("flag,fragment", [
    ("--config.loss.name=bogus", "config.loss.name='bogus'"),
    ("--config.optimizer.learning_rate=-1", "config.optimizer.learning_rate"),
    ("--config.data.train_files=/nonexistent/train.jsonl", "/nonexistent/train.jsonl"),
])
def test_main_reports_config_errors_in_one_line_without_a_traceback(flag, fragment, tmp_path):
    result = run_main(flag, f"--config.workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any setup
