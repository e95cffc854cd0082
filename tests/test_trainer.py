"""The jitted update against a naive float64 reference, gradient accumulation, and a tiny run."""
import importlib
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hsd_jax import batch, data, hindsight, losses, sharding, trainer, warmup
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
    rows = lambda r: batch.ModelRows(tokens=r.tokens, positions=r.positions, gather_index=r.gather_index)
    train_batch = batch.TrainBatch(
        student=rows(student), teacher=rows(teacher),
        response_tokens=student.response_tokens, response_mask=student.response_mask,
        distill_mask=teacher.distill_mask, advantages=rng.normal(size=8).astype(np.float32),
        sampler_logprobs=np.zeros(student.response_tokens.shape, np.float32),
    )
    return dict(reference=reference, graphdef=graphdef, params=params, batch=train_batch, student=student,
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


def test_assemble_folds_keep_into_the_mask_and_pads_the_rl_fields(setup):
    s = setup
    peers = np.array([[3, -1, -1, 0], [-1, -1, -1, -1]])
    answers = [np.array([5, 6]), np.array([7])]
    keep = np.array([True] * 4 + [False] * 4)
    advantages = np.arange(8, dtype=np.float64).reshape(2, 4)
    sampler = np.random.default_rng(1).normal(size=(8, 4))
    rl, teacher = batch.assemble(s["template"], s["questions"], s["responses"], peers, answers, context="peer_answer",
                                 buckets=8, strip_think=False, advantages=advantages, keep=keep,
                                 sampler_logprobs=sampler)
    sft, _ = batch.assemble(s["template"], s["questions"], s["responses"], peers, answers, context="peer_answer",
                            buckets=8, strip_think=False)
    lengths = [len(r) for r in s["responses"]]
    real = np.arange(16)[None] < np.array(lengths)[:, None]  # T_resp: the bucket of 9 tokens
    np.testing.assert_array_equal(rl.response_mask, real * keep[:, None])
    np.testing.assert_array_equal(sft.response_mask, real)
    np.testing.assert_array_equal(rl.advantages, np.arange(8, dtype=np.float32))
    assert rl.advantages.dtype == np.float32 and rl.sampler_logprobs.dtype == np.float32
    np.testing.assert_allclose(rl.sampler_logprobs[:, :4], sampler.astype(np.float32))
    assert not rl.sampler_logprobs[:, 4:].any() and not sft.sampler_logprobs.any() and not sft.advantages.any()
    np.testing.assert_array_equal(rl.distill_mask, np.ones(8))
    assert teacher.tokens.shape[0] == 8
    for b, response in enumerate(s["responses"]):
        np.testing.assert_array_equal(rl.response_tokens[b, : lengths[b]], response)
        prompt = hindsight.student_prompt(s["template"], s["questions"][b // 4])
        student_row = np.concatenate([prompt, response])
        np.testing.assert_array_equal(rl.student.tokens[b, : len(student_row)], student_row)
        for rows in (rl.student, rl.teacher):  # the hidden state at gather_index predicts the next token
            np.testing.assert_array_equal(rows.tokens[b, rows.gather_index[b, : lengths[b]] + 1], response)


def test_warmup_batch_learns_each_solution_as_two_peers_in_both_formats(setup):
    s = setup
    tokenizer, eos = CharTokenizer(), 63
    rows = [{"question": "1+1", "answer": "2", "solution": "1+1=2"},
            {"question": "3*3", "answer": "9", "solution": "9"}]
    config = ml_collections.ConfigDict(dict(buckets=8, strip_think=False))
    warm = warmup.warmup_batch(rows, tokenizer, s["template"], eos_id=eos, kind="math", hindsight_cfg=config)
    assert warm.response_tokens.shape[0] == 4
    for b in range(4):
        row = rows[b // 2]
        response = tokenizer.encode(row["solution"]) + [eos]
        np.testing.assert_array_equal(warm.response_tokens[b, : len(response)], response)
        question = data.user_content(row["question"], "math")
        # the teacher reads the answer and the peer's rollout, which is the same solution
        prefix = (tokenizer.encode(f"<u>{question}[A:{row['answer']}][D:{row['solution']}") + [eos]
                  + tokenizer.encode("]!</u><a>"))
        expected = prefix + response
        np.testing.assert_array_equal(warm.teacher.tokens[b, : len(expected)], expected)
        assert not warm.teacher.tokens[b, len(expected):].any()
    np.testing.assert_array_equal(warm.distill_mask, np.ones(4))


def test_place_splits_every_field_over_the_batch_axes(setup):
    mesh = sharding.make_mesh((2, 4, 1))
    placed = batch.place(setup["batch"], mesh)
    assert isinstance(placed, batch.TrainBatch) and isinstance(placed.teacher, batch.ModelRows)
    for host, device in zip(jax.tree.leaves(setup["batch"]), jax.tree.leaves(placed)):
        assert {shard.data.shape[0] for shard in device.addressable_shards} == {1}  # 8 rows over 8 devices
        np.testing.assert_array_equal(np.asarray(device), host)


@pytest.mark.parametrize("name, needs", [("hsd", True), ("opsd", True), ("sdpo", True), ("grpo_opsd", True),
                                         ("rlsd", True), ("grpo", False), ("dr_grpo", False), ("dapo", False),
                                         ("gspo", False)])
def test_needs_teacher(name, needs):
    assert losses.preset(name).needs_teacher is needs


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
