"""`trainer.Run` on the tiny config: kill -9 and resume, the stop after repeated skipped updates,
evaluation against a scripted scorer, and the warm-up on validated rows that fit its buckets.

One `Run` (module fixture) serves the in-process tests, which swap in their own files, scorer or
step; one `python main.py` run, killed and resumed, covers the command line end to end.
"""
import dataclasses
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hsd_jax import data, evaluate, reporting, rollout, trainer, warmup

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = ("--config.data.toy_examples=64", "--config.data.questions_per_step=2", "--config.sampling.group_size=4",
              "--config.sampling.max_new_tokens=12", "--config.train.micro_batch=4",
              "--config.train.sft_warmup_steps=2", "--config.train.checkpoint_every=2",
              "--config.train.eval_every=0")
# Metrics that a resumed step reproduces exactly (timings do not).
DETERMINISTIC = ("reward", "loss", "distill_loss", "ref_kl", "kl", "entropy", "grad_norm", "response_length")


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def wait_for(condition, process, timeout_s, what):
    """Polls `condition()` until it holds; fails if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"main.py exited (status {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.1)


def test_kill_9_then_rerun_resumes_and_records_each_step_once(tmp_path):
    workdir, total_steps = tmp_path / "run", 8
    command = [sys.executable, "main.py", *TINY_FLAGS, f"--config.train.steps={total_steps}",
               f"--config.workdir={workdir}"]
    # One CPU device (the test process simulates 8): the cheapest run of the same program.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    metrics_path, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
    steps = lambda rows: [r["step"] for r in rows]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Past the step-2 checkpoint (its directory is renamed into place once complete) into step 3.
            wait_for(lambda: 3 in steps(reporting.read_metrics(metrics_path)) and (checkpoints / "2").is_dir(),
                     first, 600, "step 3 logged after the step-2 checkpoint")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    # The kill lands wherever the run had got to since the poll saw step 3 (a loaded host lets it run on).
    killed = reporting.read_metrics(metrics_path)
    last_logged = len(killed)
    assert steps(killed) == list(range(1, last_logged + 1))
    assert 3 <= last_logged < total_steps, "the kill must land before the run ends"
    resume_step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())

    second = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert f"resumed from {checkpoints} at step {resume_step}" in second.stdout
    resumed = reporting.read_metrics(metrics_path)
    assert steps(resumed) == list(range(1, total_steps + 1))
    assert resumed[:resume_step] == killed[:resume_step]  # rows up to the checkpoint are kept as written
    for redone, original in zip(resumed[resume_step:last_logged], killed[resume_step:]):
        for key in DETERMINISTIC:  # a step redone from the checkpoint is the step the killed run took
            assert redone[key] == pytest.approx(original[key], rel=1e-5, abs=1e-7), (redone["step"], key)
    assert (checkpoints / str(total_steps)).is_dir()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = importlib.import_module("configs.tiny").get_config()
    config.workdir = str(tmp_path_factory.mktemp("run"))
    config.data.toy_examples = 8
    config.data.questions_per_step = 2
    config.sampling.group_size = 4
    config.sampling.max_new_tokens = 8
    config.train.micro_batch = 4
    config.train.sft_warmup_steps = 2
    config.train.steps = 10
    return trainer.Run(config)


@pytest.fixture
def quiet(run, tmp_path, monkeypatch):
    """The run with a disabled reporter, its state restored after the test."""
    monkeypatch.setattr(run, "reporter", reporting.Reporter(str(tmp_path), run.config.train.steps, enabled=False))
    monkeypatch.setattr(run, "state", run.state)
    monkeypatch.setattr(run, "ref_params", run.ref_params)
    monkeypatch.setattr(run, "warmup_path", str(tmp_path / "warmup_policy"))
    return run


def test_consecutive_skipped_updates_stop_the_run(quiet, monkeypatch):
    run, outcomes, checkpoints = quiet, iter([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), []

    def scripted_step(scorer):  # steps 1..: skipped, finite, skipped, skipped, ...
        run.state = dataclasses.replace(run.state, step=run.state.step + 1)
        return {"update_skipped": next(outcomes)}

    monkeypatch.setattr(run, "train_step", scripted_step)
    monkeypatch.setattr(run, "checkpoint", lambda: checkpoints.append(int(run.state.step)))
    monkeypatch.setattr(run.config.train, "max_skipped_updates", 2)
    monkeypatch.setattr(run.config.train, "checkpoint_every", 1)
    with pytest.raises(trainer.NonFiniteUpdates, match=r"stopped at step 4: 2 consecutive .*max_skipped_updates=2"):
        run.loop(scorer=None)
    assert int(run.state.step) == 4  # the finite step 2 reset the count; steps 3 and 4 stopped the run
    assert checkpoints == [1, 2, 3]  # the stopping step is not checkpointed


def test_evaluate_summarizes_the_rewards_it_scored(quiet, tmp_path, monkeypatch):
    run = quiet
    rows = [data.toy_problem(random.Random(i)) for i in range(2)]
    monkeypatch.setattr(run, "eval_sets", evaluate.parse_eval_files(str(write_jsonl(tmp_path / "dev.jsonl", rows)), 3))
    verdicts = {rows[0]["question"]: [1.0, 0.0, 1.0], rows[1]["question"]: [0.0, 0.0, 0.0]}
    seen = []

    def scripted_scorer(examples, completions, truncated):  # completions come n per example, in order
        seen.append(([ex["question"] for ex in examples], len(completions), np.asarray(truncated)))
        rewards = np.array([v for ex in examples for v in verdicts[ex["question"]]], np.float32)
        return rewards, ["scripted"] * len(completions)

    metrics = run.evaluate(scripted_scorer)
    assert [(questions, count) for questions, count, _ in seen] == [([r["question"] for r in rows], 6)]
    truncated = seen[0][2].mean()
    assert metrics == pytest.approx({
        "eval/dev/avg@3": 2 / 6, "eval/dev/pass@1": 2 / 6, "eval/dev/truncated": truncated,
        "eval/accuracy": 2 / 6, "eval/pass@1": 2 / 6, "eval/truncated": truncated,
        "eval/dev/response_length": metrics["eval/response_length"], "eval/response_length": metrics["eval/response_length"],
    })
    assert 1 <= metrics["eval/response_length"] <= run.config.sampling.max_new_tokens


def test_warm_up_trains_on_the_validated_rows_that_fit_its_buckets(quiet, tmp_path, monkeypatch):
    run = quiet
    good = [data.toy_problem(random.Random(i)) for i in range(2)]
    rows = [
        good[0],
        {**good[1], "question": "What is 1 + 1?", "solution": "1 + 1 = 2\n" * 400},  # ~4000 tokens > bucket 512
        {"question": "What is " + " + ".join(["1"] * 80) + "?", "answer": "80", "solution": "80"},  # prompt > 96
        {"question": "What is 2 + 2?", "solution": "4"},  # no answer: an invalid row
        good[1],
    ]
    monkeypatch.setattr(run, "train_files", {"math": [write_jsonl(tmp_path / "train.jsonl", rows)]})
    used = {}

    def record(graphdef, params, rows, make_batch, **options):
        used.update(rows=rows, make_batch=make_batch, **options)
        return params

    monkeypatch.setattr(warmup, "sft_warmup", record)
    run.warm_up()
    assert [r["question"] for r in used["rows"]] == [good[0]["question"], good[1]["question"]]
    assert used["steps"] == 2
    warm, teacher_mask = used["make_batch"](used["rows"])  # the rows it kept make a batch (3 rows each)
    assert warm.response_tokens.shape[0] == 6 and teacher_mask.shape == warm.response_mask.shape


def test_warm_up_without_solutions_names_the_missing_field(quiet, tmp_path, monkeypatch):
    run = quiet
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    monkeypatch.setattr(run, "train_files", {"math": [write_jsonl(tmp_path / "train.jsonl", rows)]})
    with pytest.raises(ValueError, match="needs a 'solution' in every training row"):
        run.warm_up()


def test_a_run_starts_from_init_params_with_fresh_optimizer_state(quiet, tmp_path, monkeypatch):
    """The warm-up saves its policy; another run given it as train.init_params starts RL there
    (step 0, fresh optimizer state, pi_0 of the reference KL), skipping its own warm-up."""
    run = quiet
    run.warm_up()
    warmed = jax.device_get(run.state.params)
    assert os.path.isdir(run.warmup_path)
    run.state = trainer.init_state(jax.tree.map(lambda p: p + 1.0, run.state.params), run.optimizer)
    run.state = dataclasses.replace(run.state, step=run.state.step + 5)
    monkeypatch.setattr(run.config.train, "init_params", run.warmup_path)
    monkeypatch.setattr(run, "warm_up", lambda: pytest.fail("a run with init_params does not warm up"))
    monkeypatch.setattr(run, "loop", lambda scorer: None)
    monkeypatch.setattr(run, "workdir", str(tmp_path))
    monkeypatch.setattr(run.config.train, "eval_every", 0)
    run.train()
    assert int(run.state.step) == 0
    for got, want, ref in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(warmed), jax.tree.leaves(run.ref_params)):
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(ref), want)
    for moment in jax.tree.leaves(run.state.opt_state):
        assert not np.asarray(moment).any()  # Adam's count and moments start at 0


def test_continuous_engine_draws_and_trains_as_the_static_one(quiet, monkeypatch):
    """Same seed, step and questions: `sampling.engine="continuous"` draws the static engine's
    rollouts and a train step from them logs the same metrics. The mesh has 8 devices (slots split
    over them); 4 questions at 8 rows per call are two static calls, whose row keys the one
    continuous call (8 slots, refilled) reproduces."""
    run = quiet
    saved = jax.tree.map(jnp.copy, run.state)
    batches = [next(run.data_iter), next(run.data_iter)]
    questions = rollout.question_tokens(run.tokenizer, batches[0] + batches[1])
    monkeypatch.setitem(run.config.sampling, "rows_per_call", 8)
    drawn, metrics = {}, {}
    scorer = lambda examples, completions, truncated: (  # a reward of the text itself: mixed groups
        np.array([len(c) % 2 for c in completions], np.float32), [""] * len(completions))
    for engine in ("static", "continuous"):
        monkeypatch.setitem(run.config.sampling, "engine", engine)
        run.state = jax.tree.map(jnp.copy, saved)  # the step's keys; the update donates the state it is given
        drawn[engine] = run.policy().sample(questions, trainer.rollout_key(run.config.seed, int(run.state.step), 0))
        monkeypatch.setattr(run, "data_iter", iter(batches[:1]))
        metrics[engine] = run.train_step(scorer)
    static, continuous = drawn["static"], drawn["continuous"]
    assert static.tokens.shape == (16, run.config.sampling.max_new_tokens)
    assert len({tuple(row) for row in static.tokens}) > 8  # rows differ: the keys are per row and per call
    np.testing.assert_array_equal(continuous.tokens, static.tokens)
    np.testing.assert_array_equal(continuous.lengths, static.lengths)
    np.testing.assert_array_equal(continuous.truncated, static.truncated)
    for out in (static, continuous):
        np.testing.assert_array_equal(out.prompt_index, np.arange(16) // 4)
    np.testing.assert_allclose(continuous.logprobs, static.logprobs, atol=1e-5, rtol=0)
    for key in DETERMINISTIC:
        assert metrics["continuous"][key] == pytest.approx(metrics["static"][key], rel=1e-5, abs=1e-7), key
