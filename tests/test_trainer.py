"""The jitted update against a naive float64 reference, gradient accumulation, and a tiny run."""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hsd_jax import hindsight, losses, trainer
from models import hf
from tests.hf_reference import make_checkpoint

VOCAB = 64


class CharTokenizer:
    """Each character is one token (ids 1..63)."""

    def encode(self, text):
        return [1 + ord(ch) % (VOCAB - 1) for ch in text]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    reference = make_checkpoint(path, vocab_size=VOCAB)
    graphdef, params = nnx.split(hf.load_model(path))
    template = hindsight.encode_template(CharTokenizer(), hindsight.TeacherTemplate(
        user_open="<u>", user_close="</u>", assistant_open="<a>", answer_open="[A:", answer_close="]",
        demo_open="[D:", demo_close="]", context_close="!", stop_texts=()))
    rng = np.random.default_rng(0)
    questions = [rng.integers(1, VOCAB, 5), rng.integers(1, VOCAB, 7)]
    answers = [rng.integers(1, VOCAB, 2), rng.integers(1, VOCAB, 3)]
    responses = [rng.integers(1, VOCAB, n) for n in (6, 9, 4, 8, 5, 7, 3, 6)]
    rewards = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32)  # group 0 has peers, group 1 none
    peers = hindsight.select_peers(rewards.reshape(2, 4), "uniform", rng=0)
    student = hindsight.build_student_batch(template, questions, responses, buckets=8)
    teacher = hindsight.build_teacher_batch(template, questions, responses, mode="peer_answer", answers=answers,
                                            peer_index=peers, buckets=8)
    batch = dict(
        student=trainer.rows_dict(student), teacher=trainer.rows_dict(teacher),
        response_tokens=student.response_tokens, response_mask=student.response_mask,
        distill_mask=teacher.distill_mask, advantages=rng.normal(size=8).astype(np.float32),
        sampler_logprobs=np.zeros(student.response_tokens.shape, np.float32),
    )
    return dict(reference=reference, graphdef=graphdef, params=params, batch=batch, student=student,
                teacher=teacher, questions=questions, responses=responses, template=template)


def torch_logprobs(model, sequence):
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(sequence)[None], dtype=torch.long)).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_hsd_loss_equals_naive_full_vocabulary_reference(setup):
    s = setup
    cfg = losses.preset("hsd", chunk_size=5)
    optimizer = optax.sgd(0.0)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), s["params"], optimizer.init(s["params"]))
    _, metrics, _ = trainer.update_step(state, s["params"], s["batch"], graphdef=s["graphdef"], optimizer=optimizer,
                                        cfg=cfg, micro_batches=2)
    per_row = []
    for b, response in enumerate(s["responses"]):
        student_seq = np.concatenate([hindsight.student_prompt(s["template"], s["questions"][b // 4]), response])
        start_t = int(s["teacher"].response_start[b])
        teacher_seq = np.concatenate([s["teacher"].tokens[b, :start_t], response])
        n, start_s = len(response), len(student_seq) - len(response)
        p = torch_logprobs(s["reference"], teacher_seq)[start_t - 1 : start_t - 1 + n]
        q = torch_logprobs(s["reference"], student_seq)[start_s - 1 : start_s - 1 + n]
        per_row.append(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))
    expected = np.mean(per_row)  # seq-mean-token-mean over all G rollouts (every row has a context)
    assert float(metrics["distill_loss"]) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["ref_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["loss"]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("name", ["hsd", "grpo", "dapo"])
def test_micro_batches_accumulate_to_the_full_batch_update(setup, name):
    s = setup
    cfg = losses.preset(name, chunk_size=4, max_response_length=16, overlong_buffer=0)
    optimizer = optax.sgd(1.0)

    def updated(micro_batches):
        params = jax.tree.map(jnp.copy, s["params"])
        state = trainer.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
        new, metrics, credit = trainer.update_step(state, s["params"], s["batch"], graphdef=s["graphdef"],
                                                   optimizer=optimizer, cfg=cfg, micro_batches=micro_batches)
        return jax.tree.leaves(new.params), float(metrics["loss"]), credit

    full, full_loss, full_credit = updated(1)
    split, split_loss, split_credit = updated(4)
    assert split_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(split_credit, full_credit, atol=1e-6)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(full, jax.tree.leaves(s["params"])))
    assert moved > 0
    for a, b in zip(full, split):
        np.testing.assert_allclose(a, b, atol=1e-6)


def tiny_config(workdir, steps):
    config = importlib.import_module("configs.tiny").get_config()
    config.workdir = str(workdir)
    config.data.toy_examples = 64
    config.data.questions_per_step = 2
    config.sampling.group_size = 4
    config.sampling.max_new_tokens = 12
    config.train.micro_batch = 4
    config.train.sft_warmup_steps = 2
    config.train.steps = steps
    config.train.checkpoint_every = 1
    return config


def test_tiny_run_trains_checkpoints_and_resumes_exactly(tmp_path):
    trainer.train(tiny_config(tmp_path / "straight", steps=3))
    trainer.train(tiny_config(tmp_path / "resumed", steps=2))
    trainer.train(tiny_config(tmp_path / "resumed", steps=3))
    straight, resumed = ([json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("straight", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for record in resumed:
        assert 0 <= record["reward"] <= 1 and np.isfinite(record["loss"])
    for key in ("reward", "loss", "kl", "response_length", "grad_norm"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key
    assert sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
