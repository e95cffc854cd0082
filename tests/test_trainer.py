"""The jitted update against float64 torch references, and the batch it reads.

The batch: two questions of G = 4 scripted rollouts with rewards [1, 0, 0, 1 | 0, 0, 0, 0], built
by `batch.from_rollouts`, so group 0 has peers and HSD's teacher reads them. The references
(HSD's KL(teacher || student), GRPO's on-policy surrogate, the k3 reference KL to a DIFFERENT
model) are computed per row in float64 with `transformers`; the update's loss and its gradient
(one SGD step of rate 1 moves the params by minus the gradient) must match them. Also: gradient
accumulation, the update on a (2, 2, 2) mesh, the non-finite guard, and the warm-up's step.
"""
import copy
import dataclasses
import functools
import importlib
import random
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from hsd_jax import batch, data, hindsight, losses, sampling, sharding, trainer, warmup
from models import hf
from tests.hf_reference import make_checkpoint

VOCAB = 64
G = 4
REWARDS = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32)  # group 0: two successes; group 1: none
SGD = optax.sgd(1.0)  # one step moves every parameter by minus its gradient
ADAM = optax.adam(1e-3)
update = jax.jit(trainer.update_step,
                 static_argnames=("graphdef", "optimizer", "cfg", "micro_batches", "minibatches", "epochs", "mesh"))


def loss_cfg(name: str) -> losses.LossConfig:
    """`name`'s preset with a strong reference KL (beta 0.5, so its value and gradient show),
    small chunks, and DAPO's overlong shaping off (responses are short)."""
    return losses.preset(name, beta=0.5, chunk_size=4, max_response_length=16, overlong_buffer=0)


class CharTokenizer:
    """Each character is one token (ids 1..63)."""

    def encode(self, text):
        return [1 + ord(ch) % (VOCAB - 1) for ch in text]


ENC = lambda text: np.array(CharTokenizer().encode(text), np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    policy_path, ref_path = tmp_path_factory.mktemp("policy"), tmp_path_factory.mktemp("ref")
    policy = make_checkpoint(policy_path, vocab_size=VOCAB)
    ref = make_checkpoint(ref_path, seed=1, vocab_size=VOCAB)  # pi_ref != pi: k3 and its gradient are not 0
    graphdef, params = nnx.split(hf.load_model(policy_path))
    _, ref_params = nnx.split(hf.load_model(ref_path))
    template = hindsight.encode_template(CharTokenizer(), hindsight.TeacherTemplate(
        user_open="<u>", user_close="</u>", assistant_open="<a>", answer_open="[A:", answer_close="]",
        demo_open="[D:", demo_close="]", context_close="!", stop_texts=()))
    rng = np.random.default_rng(0)
    questions = [rng.integers(1, VOCAB, 5), rng.integers(1, VOCAB, 7)]
    answers = [rng.integers(1, VOCAB, 2), rng.integers(1, VOCAB, 3)]
    lengths = np.array([6, 9, 4, 8, 5, 7, 3, 6], np.int32)
    tokens = np.zeros((8, 10), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, VOCAB, n)
    rollouts = sampling.Rollouts(
        tokens=tokens, logprobs=np.where(np.arange(10) < lengths[:, None], -rng.random((8, 10)), 0).astype(np.float32),
        lengths=lengths, truncated=np.zeros(8, bool), prompt_index=np.repeat(np.arange(2, dtype=np.int32), G))
    responses = [tokens[b, :n] for b, n in enumerate(lengths)]
    hindsight_cfg = ml_collections.ConfigDict(
        dict(context="peer_answer", peer_rule="uniform", buckets=8, strip_think=False, max_teacher_len=None))
    train_batch, peers, teacher = batch.from_rollouts(
        template, questions, answers, [None, None], rollouts, responses, REWARDS, hindsight_cfg=hindsight_cfg,
        loss_cfg=losses.preset("grpo"), rng=np.random.default_rng(0))
    return dict(policy=policy.double(), ref=ref.double(), graphdef=graphdef, params=params, ref_params=ref_params,
                batch=train_batch, peers=peers, teacher=teacher, questions=questions, answers=answers,
                responses=responses, template=template)


def student_prompt(s, b):
    """`<u> q </u><a>`, written out by hand."""
    return np.concatenate([ENC("<u>"), s["questions"][b // G], ENC("</u><a>")])


def teacher_prompt(s, b):
    """`<u> q [A: answer ] [D: peer rollout ] ! </u><a>` (no demonstration without a peer), by hand."""
    peer = s["peers"].reshape(-1)[b]
    demo = [] if peer < 0 else [ENC("[D:"), s["responses"][G * (b // G) + peer], ENC("]")]
    return np.concatenate([ENC("<u>"), s["questions"][b // G], ENC("[A:"), s["answers"][b // G], ENC("]"), *demo,
                           ENC("!</u><a>")])


def response_logprobs(model, prompt, response):
    """float64 log-softmax [n, V] at the positions that predict `response` after `prompt`."""
    sequence = torch.as_tensor(np.concatenate([prompt, response]), dtype=torch.long)[None]
    logits = model(sequence).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return torch.log_softmax(logits.double(), -1)


def reference_terms(s, advantages, teacher_model=None):
    """Per-row token means [B] of KL(teacher || student) over the vocabulary, the on-policy PPO
    surrogate -A exp(logp - sg(logp)) and k3 = exp(ref - logp) - (ref - logp) - 1, in float64 with
    gradients into a copy of the policy. Returns (terms, policy copy)."""
    policy = copy.deepcopy(s["policy"])
    terms = {"distill": [], "pg": [], "k3": []}
    for b, response in enumerate(s["responses"]):
        targets = torch.as_tensor(response, dtype=torch.long)
        student = response_logprobs(policy, student_prompt(s, b), response)
        logp = student[torch.arange(len(response)), targets]
        with torch.no_grad():
            teacher = response_logprobs(policy if teacher_model is None else teacher_model, teacher_prompt(s, b), response)
            ref = response_logprobs(s["ref"], student_prompt(s, b), response)[torch.arange(len(response)), targets]
        d = ref - logp
        k3 = torch.exp(d) - d - 1
        assert float(d.detach().abs().max()) < 20 and float(k3.detach().max()) < 10  # inside the estimator's clamps
        terms["distill"].append((teacher.exp() * (teacher - student)).sum(-1).mean())
        terms["pg"].append((-float(advantages[b]) * torch.exp(logp - logp.detach())).mean())
        terms["k3"].append(k3.mean())
    return {k: torch.stack(v) for k, v in terms.items()}, policy


def one_step(s, cfg, train_batch, *, micro_batches, optimizer=SGD, mesh=None, params=None, ref_params=None):
    """(new state, metrics, credit) of one `update_step` from `params` (default the policy's)."""
    params = s["params"] if params is None else params
    state = trainer.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    ref_params = s["ref_params"] if ref_params is None else ref_params
    return update(state, ref_params, train_batch, graphdef=s["graphdef"], optimizer=optimizer, cfg=cfg,
                  micro_batches=micro_batches, mesh=mesh)


def ppo_reference(s, cfg, advantages, schedule, learning_rate):
    """Float64 torch PPO: old log-probs from the initial policy, then one SGD step per entry of
    `schedule` (the rows of that minibatch) on the mean over its rows of the row objective:
    token ratio (GRPO): mean_t max(-A r_t, -A clip(r_t)); sequence ratio (GSPO): the same of
    r = exp(mean_t(log p - log p_old)); plus, with cfg.beta > 0, beta mean_t k3 to the reference
    model s["ref"]. Returns (final policy, clipped-token fraction per step, mean k3 per step)."""
    policy = copy.deepcopy(s["policy"])
    prompts = [student_prompt(s, b) for b in range(len(s["responses"]))]

    def row_logprobs(model, b):
        response = s["responses"][b]
        logp = response_logprobs(model, prompts[b], response)
        return logp[torch.arange(len(response)), torch.as_tensor(response, dtype=torch.long)]

    with torch.no_grad():
        old = [row_logprobs(policy, b) for b in range(len(prompts))]
        ref = [row_logprobs(s["ref"], b) for b in range(len(prompts))]
    clipped, kls = [], []
    for rows in schedule:
        policy.zero_grad()
        losses_, flags, row_kls = [], [], []
        for b in rows:
            logp = row_logprobs(policy, b)
            log_ratio = logp - old[b]
            ratio = torch.exp(log_ratio.mean()) if cfg.ratio_level == "sequence" else torch.exp(log_ratio)
            a = float(advantages[b])
            unclipped, clip = -a * ratio, -a * torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
            d = ref[b] - logp
            row_kls.append((torch.exp(d) - d - 1).mean())
            losses_.append(torch.maximum(unclipped, clip).mean() + cfg.beta * row_kls[-1])
            flags.append(torch.broadcast_to(clip > unclipped, log_ratio.shape).double())
        torch.stack(losses_).mean().backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= learning_rate * p.grad
        clipped.append(float(torch.cat(flags).mean()))
        kls.append(float(torch.stack(row_kls).detach().mean()))
    return policy, clipped, kls


@pytest.mark.parametrize("name, minibatches, epochs, beta",
                         [("gspo", 2, 1, 0.0), ("grpo", 2, 1, 0.0), ("gspo", 1, 2, 0.0), ("grpo", 2, 1, 0.5)])
def test_ppo_updates_after_the_first_follow_the_float64_clipped_objective(setup, name, minibatches, epochs, beta):
    """Several optimizer steps per rollout batch: the ratio to the sampling policy (one forward
    pass before the first step) leaves 1 and clipping acts, GSPO on the sequence ratio. With a
    reference KL (beta > 0) every step reads the reference model's log-probs of its own rows,
    computed once before the first step."""
    s, learning_rate = setup, 0.3
    cfg = losses.preset(name, beta=beta, chunk_size=4, max_response_length=16)
    advantages = np.array([0.9, -0.7, -1.1, 0.5, 0.3, -0.4, 1.2, -0.8], np.float32)
    train_batch = dataclasses.replace(s["batch"], advantages=advantages)
    rows = np.arange(8)
    schedule = [rows[k::minibatches] for k in range(minibatches)] * epochs  # minibatch k: rows k, k + K, ...
    policy, clipped, kls = ppo_reference(s, cfg, advantages, schedule, learning_rate)
    optimizer = optax.sgd(learning_rate)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), s["params"], optimizer.init(s["params"]))
    ref_params = s["ref_params"] if beta > 0 else None
    new, metrics, _ = update(state, ref_params, train_batch, graphdef=s["graphdef"], optimizer=optimizer, cfg=cfg,
                             micro_batches=1, minibatches=minibatches, epochs=epochs)

    assert int(new.step) == 1 and float(metrics["optimizer_steps"]) == minibatches * epochs
    assert clipped[0] == 0 and clipped[-1] > 0  # the first step is on-policy; the ratio then leaves the band
    assert float(metrics["clip_frac"]) == pytest.approx(np.mean(clipped), abs=1e-6)
    if beta > 0:
        assert min(kls) > 1e-3  # the reference model differs: the KL term is not trivially 0
        assert float(metrics["ref_kl"]) == pytest.approx(np.mean(kls), rel=1e-4)
    expected = {key: p.detach().numpy() for key, p in policy.named_parameters()}
    moved = max(np.abs(expected[k] - p.detach().numpy()).max() for k, p in s["policy"].named_parameters())
    assert moved > 1e-3
    for key, value in hf_named(s, new.params).items():
        np.testing.assert_allclose(value, expected[key], atol=2e-5 * moved, err_msg=key)


def test_gspo_and_grpo_differ_only_once_the_ratio_leaves_one(setup):
    """On-policy (one step) GSPO's gradient is GRPO's; over two minibatch steps they differ."""
    s, optimizer = setup, optax.sgd(0.3)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), s["params"], optimizer.init(s["params"]))
    final = {}
    for name in ("grpo", "gspo"):
        for minibatches in (1, 2):
            cfg = losses.preset(name, beta=0.0, chunk_size=4, max_response_length=16)
            new, metrics, _ = update(jax.tree.map(jnp.copy, state), None, s["batch"], graphdef=s["graphdef"],
                                     optimizer=optimizer, cfg=cfg, micro_batches=2, minibatches=minibatches)
            final[name, minibatches] = new.params
            if minibatches == 1:
                assert float(metrics["clip_frac"]) == 0
    gap = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert gap(final["grpo", 1], final["gspo", 1]) < 1e-6
    assert gap(final["grpo", 2], final["gspo", 2]) > 1e-4


def hf_named(s, state):
    """An nnx.State shaped like the params as HF-named host arrays."""
    return hf.hf_tensors(nnx.merge(s["graphdef"], state))


def test_peers_are_drawn_from_the_successes_and_shown_to_the_teacher(setup):
    s, b = setup, setup["batch"]
    peers = s["peers"]
    assert peers[0, 0] == 3 and peers[0, 3] == 0 and set(peers[0, 1:3]) <= {0, 3}
    np.testing.assert_array_equal(peers[1], [-1] * G)
    np.testing.assert_array_equal(b.distill_mask, np.ones(8))  # peer_answer: the answer alone without a peer
    a = np.sqrt(3) / 2  # (1 - 1/2) / std([1, 0, 0, 1], ddof=1)
    np.testing.assert_allclose(b.advantages, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-5)
    for row, response in enumerate(s["responses"]):
        for rows, prompt in ((b.student, student_prompt(s, row)), (b.teacher, teacher_prompt(s, row))):
            expected = np.concatenate([prompt, response])
            np.testing.assert_array_equal(rows.tokens[row, : len(expected)], expected)
            assert not rows.tokens[row, len(expected):].any()
            np.testing.assert_array_equal(rows.tokens[row, rows.gather_index[row, : len(response)] + 1], response)
        np.testing.assert_array_equal(b.response_tokens[row, : len(response)], response)


@pytest.mark.parametrize("name, advantages", [("hsd", "scored"), ("grpo", "scored"), ("grpo", "zero")],
                         ids=["hsd-peer-context", "grpo-pg-and-ref-kl", "grpo-ref-kl-only"])
def test_update_loss_and_gradient_equal_the_float64_reference(setup, name, advantages):
    """HSD (distillation from the peer context + beta k3) and GRPO (PG + beta k3); with zero
    advantages only GRPO's reference-KL term carries a gradient."""
    s, cfg = setup, loss_cfg(name)
    assert cfg.agg == "seq-mean-token-mean"  # every row is kept and distilled: the loss is a mean over rows
    train_batch = s["batch"] if advantages == "scored" else dataclasses.replace(
        s["batch"], advantages=np.zeros(8, np.float32))
    terms, policy = reference_terms(s, train_batch.advantages)
    expected = {k: v.mean() for k, v in terms.items()}
    loss = cfg.w_pg * expected["pg"] + cfg.w_sd * expected["distill"] + cfg.beta * expected["k3"]
    loss.backward()
    new, metrics, _ = one_step(s, cfg, train_batch, micro_batches=4)

    expected = {k: float(v.detach()) for k, v in expected.items()}
    assert expected["k3"] > 1e-3  # the reference model differs: the KL term is not trivially 0
    assert float(metrics["ref_kl"]) == pytest.approx(expected["k3"], rel=1e-4)
    assert float(metrics["distill_loss"]) == pytest.approx(expected["distill"] if cfg.w_sd else 0.0, abs=1e-6)
    assert float(metrics["pg_loss"]) == pytest.approx(expected["pg"] if cfg.w_pg else 0.0, abs=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
    gradient = hf_named(s, jax.tree.map(lambda before, after: before - after, s["params"], new.params))
    reference = {key: p.grad.numpy() for key, p in policy.named_parameters()}
    assert set(gradient) == set(reference)
    scale = max(np.abs(g).max() for g in reference.values())
    assert scale > 1e-3
    for key, value in reference.items():
        np.testing.assert_allclose(gradient[key], value, atol=2e-5 * scale, err_msg=key)


@pytest.mark.parametrize("name", ["hsd", "grpo", "dapo"])
def test_micro_batches_accumulate_to_the_full_batch_update(setup, name):
    s, cfg = setup, loss_cfg(name)
    full, full_metrics, full_credit = one_step(s, cfg, s["batch"], micro_batches=1)
    split, split_metrics, split_credit = one_step(s, cfg, s["batch"], micro_batches=4)
    for key in ("loss", "pg_loss", "distill_loss", "ref_kl"):
        assert float(split_metrics[key]) == pytest.approx(float(full_metrics[key]), rel=1e-5, abs=1e-7), key
    np.testing.assert_allclose(split_credit, full_credit, atol=1e-6)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(s["params"])))
    assert moved > 1e-4
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(split.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["hsd", "grpo"])
def test_update_on_a_2x2x2_mesh_equals_the_unsharded_update(setup, name):
    s, cfg = setup, loss_cfg(name)
    mesh = sharding.make_mesh((2, 2, 2))
    place = lambda params: sharding.reshard(params, sharding.state_shardings(params, mesh))
    params, ref_params = place(s["params"]), place(s["ref_params"])
    sharded, sharded_metrics, sharded_credit = one_step(
        s, cfg, batch.place(s["batch"], mesh), micro_batches=2, mesh=mesh, params=params, ref_params=ref_params)
    plain, plain_metrics, plain_credit = one_step(s, cfg, s["batch"], micro_batches=1)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(sharded.params)}
    assert any(axis is not None for spec in specs for axis in spec)  # the update really ran split over the mesh
    assert float(sharded_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(sharded_credit, plain_credit, atol=1e-6)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def assert_bitwise_equal(a, b):
    """Same tree, and every leaf the same bytes (NaN payloads included)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def with_nan(tree):
    """`tree` with the first element of its first leaf set to NaN."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


def test_a_non_finite_update_is_skipped_and_leaves_the_state_bit_identical(setup):
    s, cfg = setup, loss_cfg("grpo")
    step = functools.partial(update, graphdef=s["graphdef"], optimizer=ADAM, cfg=cfg, micro_batches=4)
    start = trainer.TrainState(jnp.zeros((), jnp.int32), s["params"], ADAM.init(s["params"]))
    finite, metrics, _ = step(start, s["ref_params"], s["batch"])  # a finite step: Adam's moments become non-zero
    assert float(metrics["update_skipped"]) == 0 and int(finite.step) == 1
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(finite.params), jax.tree.leaves(s["params"])))

    nan_advantage = np.array(s["batch"].advantages)
    nan_advantage[2] = np.nan
    for state, train_batch in ((finite, dataclasses.replace(s["batch"], advantages=nan_advantage)),
                               (dataclasses.replace(finite, params=with_nan(finite.params)), s["batch"])):
        after, metrics, _ = step(state, s["ref_params"], train_batch)
        assert float(metrics["update_skipped"]) == 1
        assert int(after.step) == int(state.step) + 1
        assert_bitwise_equal(after.params, state.params)
        assert_bitwise_equal(after.opt_state, state.opt_state)


def test_sft_step_loss_is_the_torch_nll_and_a_step_lowers_it(setup):
    s, b = setup, setup["batch"]

    def mean_nll(prompt_of, rows):  # a token mean over the rows
        with torch.no_grad():
            logprobs = [response_logprobs(s["policy"], prompt_of(s, row), r)[torch.arange(len(r)), torch.as_tensor(r)]
                        for row, r in enumerate(s["responses"]) if row in rows]
        return -float(torch.cat(logprobs).mean())

    teacher_rows = (1, 2, 5)  # the teacher format learns only where its mask says
    teacher_mask = np.array(b.response_mask) * np.isin(np.arange(8), teacher_rows)[:, None]
    expected = (mean_nll(student_prompt, range(8)) + mean_nll(teacher_prompt, teacher_rows)) / 2
    optimizer = optax.adam(1e-2)
    step = jax.jit(functools.partial(warmup.sft_step, graphdef=s["graphdef"], optimizer=optimizer, chunk_size=4))
    params, opt_state, loss = step(s["params"], optimizer.init(s["params"]), b, teacher_mask)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    _, _, after = step(params, opt_state, b, teacher_mask)
    assert float(after) < float(loss) - 1e-3


def test_sft_warmup_needs_a_solution_in_every_row(setup):
    with pytest.raises(ValueError, match="needs a 'solution' in every training row"):
        warmup.sft_warmup(setup["graphdef"], setup["params"], [{"question": "1+1", "answer": "2"}], lambda rows: None,
                          steps=1, learning_rate=1e-3, rows_per_step=1, chunk_size=4,
                          mesh=sharding.make_mesh((1, -1, 1)), rng=np.random.default_rng(0))


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
        student_row = np.concatenate([student_prompt(s, b), response])
        np.testing.assert_array_equal(rl.student.tokens[b, : len(student_row)], student_row)
        for rows in (rl.student, rl.teacher):  # the hidden state at gather_index predicts the next token
            np.testing.assert_array_equal(rows.tokens[b, rows.gather_index[b, : lengths[b]] + 1], response)


def teacher_prefix(tokenizer, eos, question, answer, demo=None):
    """The CharTokenizer teacher prompt of `setup`'s template, by hand."""
    demo_block = [] if demo is None else tokenizer.encode(f"[D:{demo}") + [eos] + tokenizer.encode("]")
    return tokenizer.encode(f"<u>{question}[A:{answer}]") + demo_block + tokenizer.encode("!</u><a>")


def test_warmup_batch_teaches_the_teacher_both_hsd_contexts(setup):
    s = setup
    tokenizer, eos = CharTokenizer(), 63
    rows = [{"question": "1+1", "answer": "2", "solution": "1+1=2"},
            {"question": "3*3", "answer": "9", "solution": "9"}]
    config = ml_collections.ConfigDict(dict(buckets=8, strip_think=False, max_tests_tokens=64))
    warm, teacher_mask = warmup.warmup_batch(rows, tokenizer, s["template"], eos_id=eos, kind="math",
                                             hindsight_cfg=config)
    assert warm.response_tokens.shape[0] == 6
    for b in range(6):
        row = rows[b // 3]
        response = tokenizer.encode(row["solution"]) + [eos]
        np.testing.assert_array_equal(warm.response_tokens[b, : len(response)], response)
        question = data.user_content(row["question"], "math")
        # the first reads the answer and its peer (the solution); the others the answer alone
        demo = row["solution"] if b % 3 == 0 else None
        expected = teacher_prefix(tokenizer, eos, question, row["answer"], demo) + response
        np.testing.assert_array_equal(warm.teacher.tokens[b, : len(expected)], expected)
        assert not warm.teacher.tokens[b, len(expected):].any()
    np.testing.assert_array_equal(warm.response_mask, teacher_mask + np.isin(np.arange(6), (1, 4))[:, None] * warm.response_mask)
    assert not teacher_mask[[1, 4]].any()


def test_warmup_batch_with_slips_hides_every_slip_from_the_teacher(setup):
    tokenizer, eos = CharTokenizer(), 63
    rng = random.Random(3)
    rows = [data.toy_problem(rng) for _ in range(6)] + [{"question": "1+1", "answer": "2", "solution": "1+1=2"}]
    config = ml_collections.ConfigDict(dict(buckets=64, strip_think=False, max_tests_tokens=64))
    warm, teacher_mask = warmup.warmup_batch(rows, tokenizer, setup["template"], eos_id=eos, kind="math",
                                             hindsight_cfg=config, slip_rate=0.5, rng=np.random.default_rng(0))
    lengths = np.asarray(warm.response_mask).sum(1).astype(int)
    symbols = {tokenizer.encode(c)[0]: c for c in "123456>\n"}
    slipped_lines = 0
    for q, row in enumerate(rows):
        solution = tokenizer.encode(row["solution"]) + [eos]
        np.testing.assert_array_equal(warm.response_tokens[3 * q + 1, : len(solution)], solution)
        assert not teacher_mask[3 * q + 1].any()
        question = data.user_content(row["question"], "math")
        walk = re.fullmatch(r"Follow \d arrows from \d:\n((?:\d>\d\n)+)", row["question"])
        arrows = dict(line.split(">") for line in walk.group(1).splitlines()) if walk else {}
        for b, demo in ((3 * q, row["solution"]), (3 * q + 2, None)):
            written = list(np.asarray(warm.response_tokens[b, : lengths[b]]))
            assert len(written) == len(solution) and written[-1] == eos  # a slip rewrites symbols only
            expected = teacher_prefix(tokenizer, eos, question, row["answer"], demo) + written
            np.testing.assert_array_equal(warm.teacher.tokens[b, : len(expected)], expected)
            # The teacher learns every character of the written walk but its slipped lines: those whose
            # arrow is not the table's (one character per token here; the walk's lines read back).
            walk_chars = 4 * data.TOY_MOVES if arrows else 0  # its arrow lines ("a>b\n" each)
            text = "".join(symbols[int(t)] for t in written[:walk_chars])
            unmasked, offset = np.ones(len(written)), 0
            for line in text.splitlines(keepends=True):
                if arrows[line[0]] != line[2]:
                    unmasked[offset : offset + len(line)] = 0
                    slipped_lines += 1
                offset += len(line)
            assert (text == row["solution"][:walk_chars]) == unmasked.all()
            np.testing.assert_array_equal(teacher_mask[b, : len(written)], unmasked)
            assert not teacher_mask[b, len(written):].any()
    assert slipped_lines >= 30  # rate 0.5 over 8 lines of 12 toy walks; never the row that is no walk


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


def test_ema_teacher_reads_its_own_weights_and_follows_the_policy(setup):
    """SDPO's EMA teacher: the teacher pass reads the EMA weights (here a different model), and
    after the update they move to (1 - r) * teacher + r * new params."""
    s = setup
    cfg = losses.preset("hsd", beta=0.0, chunk_size=4, max_response_length=16, teacher_ema=0.05)
    state = trainer.TrainState(jnp.zeros((), jnp.int32), s["params"], SGD.init(s["params"]), s["ref_params"])
    new, metrics, _ = update(state, None, s["batch"], graphdef=s["graphdef"], optimizer=SGD, cfg=cfg, micro_batches=2)
    terms, _ = reference_terms(s, np.zeros(8), teacher_model=s["ref"])
    assert float(metrics["distill_loss"]) == pytest.approx(float(terms["distill"].detach().mean()), rel=1e-4)
    _, own, _ = one_step(s, cfg, s["batch"], micro_batches=2)  # no EMA weights: the teacher is the policy
    assert abs(float(own["distill_loss"]) - float(metrics["distill_loss"])) > 1e-3
    for teacher, before, after in zip(jax.tree.leaves(new.teacher_params), jax.tree.leaves(s["ref_params"]),
                                      jax.tree.leaves(new.params)):
        np.testing.assert_allclose(teacher, 0.95 * np.asarray(before) + 0.05 * np.asarray(after), rtol=1e-6, atol=1e-7)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(s["params"])))
    assert moved > 0


def test_sdpo_variant_keeps_an_ema_teacher_and_strips_demonstrations_think_blocks():
    from hsd_jax import validation

    config = validation.resolve(importlib.import_module("configs.tiny").get_config("sdpo"))
    assert validation.loss_config(config).teacher_ema == 0.05
    assert config.hindsight.strip_think is True and config.hindsight.context == "peer"
    hsd = validation.resolve(importlib.import_module("configs.tiny").get_config("hsd"))
    assert validation.loss_config(hsd).teacher_ema == 0.0 and hsd.hindsight.strip_think is False


class ScriptedRun:
    """What `trainer.Run.collect` reads of a run at step STEP: question batches of 2 examples
    (ids 0, 1 | 2, 3 | ...)."""

    GROUP_REWARDS = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 1]]
    SEED, STEP = 7, 3

    def __init__(self, name, max_refill_batches):
        self.loss_cfg = losses.preset(name)
        self.config = ml_collections.ConfigDict(dict(seed=self.SEED, train=dict(max_refill_batches=max_refill_batches),
                                                     sampling=dict(group_size=G)))
        self.state = trainer.TrainState(jnp.int32(self.STEP), None, None)
        self.data_iter = iter([[{"id": i}, {"id": i + 1}] for i in range(0, len(self.GROUP_REWARDS), 2)])
        self.tokenizer, self.data_kind = None, "math"


class ScriptedPolicy:
    """A sampler whose G = 4 rollouts of example i are tokens [i, i, i]; it records its keys."""

    def __init__(self):
        self.keys = []

    def sample(self, questions, key):
        self.keys.append(key)
        ids = np.repeat([int(q[0]) for q in questions], G)
        return sampling.Rollouts(tokens=np.repeat(ids[:, None], 3, 1), logprobs=np.zeros((len(ids), 3), np.float32),
                                 lengths=np.full(len(ids), 3), truncated=np.zeros(len(ids), bool),
                                 prompt_index=np.repeat(np.arange(len(questions)), G))


def stream_key(stream, fold=None):
    """The key of `stream` at ScriptedRun's seed and step, folded with `fold`, spelled out."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ScriptedRun.SEED), stream), ScriptedRun.STEP)
    return key if fold is None else jax.random.fold_in(key, fold)


@pytest.mark.parametrize("name, limit, refills, kept, streams", [
    ("grpo", 10, 0, [0, 1], [(trainer.STREAM_SAMPLE, None)]),  # no dynamic sampling: the first batch as drawn
    ("dapo", 10, 2, [2, 4], [(trainer.STREAM_SAMPLE, None), (trainer.STREAM_REFILL, 1), (trainer.STREAM_REFILL, 2)]),
    ("dapo", 1, 1, [2, 0], [(trainer.STREAM_SAMPLE, None), (trainer.STREAM_REFILL, 1)]),  # topped up, masked later
], ids=["grpo", "dapo-refills-until-full", "dapo-stops-at-the-limit"])
def test_dapo_dynamic_sampling_draws_question_batches_until_the_groups_are_mixed(monkeypatch, name, limit, refills,
                                                                                  kept, streams):
    run, policy = ScriptedRun(name, limit), ScriptedPolicy()
    monkeypatch.setattr(trainer.rollout, "question_tokens", lambda tok, examples, kind="math": [np.array([ex["id"]]) for ex in examples])
    monkeypatch.setattr(trainer.rollout, "score", lambda scorer, tok, examples, rollouts: (
        np.array([r for ex in examples for r in ScriptedRun.GROUP_REWARDS[ex["id"]]], np.float32), None))
    times = {}
    scored, drawn = trainer.Run.collect(run, policy, None, times)
    assert drawn == refills and set(times) == {"sample_s", "score_s"}
    assert len(policy.keys) == len(streams)
    for key, (stream, fold) in zip(policy.keys, streams):
        np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(stream_key(stream, fold)))
    assert [ex["id"] for ex in scored.examples] == kept
    np.testing.assert_array_equal(scored.rewards, [r for i in kept for r in ScriptedRun.GROUP_REWARDS[i]])
    np.testing.assert_array_equal(scored.rollouts.tokens[:, 0], np.repeat(kept, G))
    np.testing.assert_array_equal(scored.rollouts.prompt_index, np.repeat([0, 1], G))
    assert [int(q[0]) for q in scored.questions] == kept
