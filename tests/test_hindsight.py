"""Hindsight contexts: peers, teacher/student batches and their alignment, tau, credit, coverage.

References are built independently: expected prompts as *text* joined by hand and encoded with a
one-character-per-token fake tokenizer (so token counts are character counts), think blocks removed
with a regex, peers and coverage by plain Python loops, logprobs by a separate forward per row.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hsd_jax import hindsight as hs
from models import hf
from tests.hf_reference import make_checkpoint, torch_logits

TEMPLATE = hs.TeacherTemplate()


class CharTokenizer:
    """One token per character: '\\n' -> 96, chr(32 + k) -> k + 1 (vocab 97, 0 never produced)."""

    def encode(self, text):
        return [96 if c == "\n" else ord(c) - 31 for c in text]


TOK = CharTokenizer()
TT = hs.encode_template(TOK, TEMPLATE)


def enc(text):
    return np.array(TOK.encode(text), np.int32)


def strip_think_text(text):
    return re.sub(r"<think>.*?</think>", "", text, count=1, flags=re.S)


def teacher_text(question, answer=None, demo=None):
    """The teacher prompt joined as text, independently of the library."""
    t = TEMPLATE
    context = ""
    if answer is not None:
        context += t.answer_open + answer + t.answer_close
    if demo is not None:
        context += t.demo_open + demo + t.demo_close
    if context:
        context += t.context_close
    return t.user_open + question + context + t.user_close + t.assistant_open


def student_text(question):
    return TEMPLATE.user_open + question + TEMPLATE.user_close + TEMPLATE.assistant_open


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", hs.PEER_RULES)
def test_peer_is_never_self_and_exists_iff_another_success(rule):
    rng = np.random.default_rng(0)
    rewards = (rng.random((300, 6)) < 0.4).astype(np.float32)
    peers = hs.select_peers(
        rewards, rule, rng=1, lengths=rng.integers(1, 50, rewards.shape), mean_logprobs=-rng.random(rewards.shape)
    )
    assert peers.shape == rewards.shape
    for g in range(rewards.shape[0]):
        for i in range(rewards.shape[1]):
            others = [j for j in range(rewards.shape[1]) if j != i and rewards[g, j] == 1]
            if others:
                assert peers[g, i] in others
            else:
                assert peers[g, i] == -1


def test_uniform_peer_is_uniform_and_deterministic():
    group = np.array([1, 0, 1, 1, 0, 1, 0, 0], np.float32)
    rewards = np.tile(group, (4000, 1))
    peers = hs.select_peers(rewards, "uniform", rng=np.random.default_rng(7))
    # chi-square critical values at 0.999: df=3 -> 16.27, df=2 -> 13.82
    for i, candidates, critical in [(1, [0, 2, 3, 5], 16.27), (0, [2, 3, 5], 13.82)]:
        counts = np.array([np.sum(peers[:, i] == c) for c in candidates])
        assert counts.sum() == len(rewards)
        expected = len(rewards) / len(candidates)
        assert np.sum((counts - expected) ** 2 / expected) < critical, counts
    np.testing.assert_array_equal(peers, hs.select_peers(rewards, "uniform", rng=7))
    assert not np.array_equal(peers, hs.select_peers(rewards, "uniform", rng=8))
    gen = np.random.default_rng(3)
    assert not np.array_equal(hs.select_peers(rewards, rng=gen), hs.select_peers(rewards, rng=gen))


def test_deterministic_rules_pick_the_right_peer():
    rewards = np.array([0, 1, 0, 1, 1, 0])
    lengths = np.array([5, 9, 3, 4, 7, 2])
    mean_logprobs = np.array([-0.5, -2.0, -0.1, -0.3, -1.0, -0.2])  # successes: 1 (ppl e^2), 3 (e^.3), 4 (e^1)
    expected = {
        "first": [1, 3, 1, 1, 1, 1],
        "shortest": [3, 3, 3, 4, 3, 3],
        "lowest_ppl": [3, 3, 3, 4, 3, 3],
        "highest_ppl": [1, 4, 1, 1, 1, 1],
    }
    for rule, peers in expected.items():
        got = hs.select_peers(rewards, rule, lengths=lengths, mean_logprobs=mean_logprobs)
        np.testing.assert_array_equal(got, peers, err_msg=rule)
    with pytest.raises(ValueError, match="lengths"):
        hs.select_peers(rewards, "shortest")
    with pytest.raises(ValueError, match="rng"):
        hs.select_peers(rewards, "uniform")


# ----------------------------------------------------------------------------------------------
# Context modes
# ----------------------------------------------------------------------------------------------

QUESTIONS = ["What is 2+3?", "Name a prime."]
ANSWERS = ["5", "7"]
ROLLOUTS = [  # N=2 questions x G=3, group-major
    "<think>two plus three</think>The answer is 5, since two plus three is five.<|im_end|>",
    "It is 6 because I added wrong and got six at the end.<|im_end|>",
    "<think>add</think>5<|im_end|>",
    "9<|im_end|>",
    "4, no",
    "<think>hmm</think>Seven.<|im_end|>",
]
REWARDS = np.array([[1, 0, 1], [0, 0, 1]])


def teacher_prefixes(batch):
    return [batch.tokens[b, : batch.response_start[b]].tolist() for b in range(len(ROLLOUTS))]


def test_modes_masks_fallback_and_prompts():
    peers = hs.select_peers(REWARDS, "first")
    np.testing.assert_array_equal(peers, [[2, 0, 0], [2, 2, -1]])
    questions, answers = hs.encode_texts(TOK, QUESTIONS), hs.encode_texts(TOK, ANSWERS)
    rollouts = [enc(r) for r in ROLLOUTS]
    build = lambda mode, **kw: hs.build_teacher_batch(TT, questions, rollouts, mode=mode, buckets=16, **kw)

    def demo(b, g, strip=False):  # peer rollout text, stop removed (and the think block if strip)
        text = ROLLOUTS[3 * g + peers[g, b % 3]].removesuffix("<|im_end|>")
        return strip_think_text(text) if strip else text

    hsd = build("peer_answer", answers=answers, peer_index=peers)  # default: reasoning kept
    np.testing.assert_array_equal(hsd.distill_mask, [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(hsd.has_peer, [1, 1, 1, 1, 1, 0])
    expected = [teacher_text(QUESTIONS[b // 3], ANSWERS[b // 3], demo(b, b // 3)) for b in range(5)]
    expected.append(teacher_text(QUESTIONS[1], ANSWERS[1]))  # HSD fallback: the answer alone
    assert "<think>two plus three</think>" in expected[1]  # row 1's peer is rollout 0
    assert teacher_prefixes(hsd) == [TOK.encode(s) for s in expected]

    sdpo = build("peer", peer_index=peers, strip_think_block=True)
    np.testing.assert_array_equal(sdpo.distill_mask, [1, 1, 1, 1, 1, 0])
    expected = [teacher_text(QUESTIONS[b // 3], demo=demo(b, b // 3, strip=True)) for b in range(5)]
    assert "<think>" not in "".join(expected)
    assert teacher_prefixes(sdpo)[:5] == [TOK.encode(s) for s in expected]

    opsd = build("answer", answers=answers)
    np.testing.assert_array_equal(opsd.distill_mask, np.ones(6))
    assert teacher_prefixes(opsd) == [TOK.encode(teacher_text(QUESTIONS[b // 3], ANSWERS[b // 3])) for b in range(6)]

    solutions = ["<think>x</think>2 and 3 make 5.", "7 is prime."]
    sol = build("solution", solutions=hs.encode_texts(TOK, solutions))
    expected = [teacher_text(QUESTIONS[b // 3], demo=solutions[b // 3]) for b in range(6)]
    assert teacher_prefixes(sol) == [TOK.encode(s) for s in expected]
    with pytest.raises(ValueError, match=r"solutions\[1\] is missing"):
        build("solution", solutions=[enc("x"), None])

    grpo = build("none")
    student = hs.build_student_batch(TT, questions, rollouts, buckets=16)
    np.testing.assert_array_equal(grpo.distill_mask, np.zeros(6))
    np.testing.assert_array_equal(grpo.tokens, student.tokens)
    assert [student.tokens[b, : student.response_start[b]].tolist() for b in range(6)] == [
        TOK.encode(student_text(QUESTIONS[b // 3])) for b in range(6)
    ]
    with pytest.raises(ValueError, match="peer_index"):
        build("peer_answer", answers=answers)


def test_strip_think_and_stops_in_token_space():
    o, c = TT.think_open, TT.think_close
    cases = ["ab<think>xy</think>cd", "xy</think>cd", "ab<think>never closed", "plain", "</think>"]
    expected = ["abcd", "cd", "ab", "plain", ""]
    for text, want in zip(cases, expected):
        assert hs.strip_think(enc(text), o, c).tolist() == TOK.encode(want), text
    assert hs.strip_stops(enc("ok<|im_end|><|endoftext|>"), TT.stops).tolist() == TOK.encode("ok")


def test_bucket_length():
    assert [hs.bucket_length(n, 128) for n in (0, 1, 128, 129)] == [128, 128, 128, 256]
    assert hs.bucket_length(300, (256, 512, 1024)) == 512
    with pytest.raises(ValueError, match="largest bucket"):
        hs.bucket_length(2000, (256, 512, 1024))


# ----------------------------------------------------------------------------------------------
# Alignment with the model
# ----------------------------------------------------------------------------------------------


def response_logprobs(model, batch, targets):
    """Batched: ONE jitted forward of `batch`, gather at its `gather_index`, log-softmax, take `targets`."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens, positions, segment_ids, index, targets):
        model = nnx.merge(graphdef, state)
        hidden, _ = model(tokens, positions, segment_ids)
        logp = jax.nn.log_softmax(model.logits(hs.gather_positions(hidden, index)))
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    return np.asarray(run(state, batch.tokens, batch.positions, batch.segment_ids, batch.gather_index, targets))


def single_logprobs(reference, prompt_text, rollout_text):
    """Reference: a separate unpadded forward of the same weights in transformers on [prompt ; rollout]."""
    full, P = enc(prompt_text + rollout_text), len(prompt_text)
    logp = torch.log_softmax(torch.as_tensor(torch_logits(reference, full[None].copy())[0]), dim=-1).numpy()
    return np.array([logp[P - 1 + t, full[P + t]] for t in range(len(rollout_text))])


def test_teacher_and_student_logprobs_match_separate_forwards(tmp_path):
    reference = make_checkpoint(tmp_path)
    model = hf.load_model(tmp_path)
    peers = hs.select_peers(REWARDS, "first")
    questions, answers = hs.encode_texts(TOK, QUESTIONS), hs.encode_texts(TOK, ANSWERS)
    rollouts = [enc(r) for r in ROLLOUTS]
    max_len = len(teacher_text(QUESTIONS[0], ANSWERS[0], "")) + len(ROLLOUTS[0]) + 3  # row 1's demo gets cut
    teacher = hs.build_teacher_batch(
        TT, questions, rollouts, mode="peer_answer", answers=answers, peer_index=peers, max_len=max_len, buckets=16
    )
    student = hs.build_student_batch(TT, questions, rollouts, buckets=16)
    assert teacher.gather_index.shape == student.gather_index.shape == student.response_mask.shape
    assert teacher.tokens.shape[1] % 16 == 0 and teacher.tokens.shape[1] <= max_len + 15

    got_teacher = response_logprobs(model, teacher, student.response_tokens)
    got_student = response_logprobs(model, student, student.response_tokens)
    dropped = []
    for b, rollout in enumerate(ROLLOUTS):
        g, peer = b // 3, peers[b // 3, b % 3]
        prompt = teacher_text(QUESTIONS[g], ANSWERS[g])
        if peer >= 0:
            demo = ROLLOUTS[3 * g + peer].removesuffix("<|im_end|>")
            keep = max_len - len(teacher_text(QUESTIONS[g], ANSWERS[g], "")) - len(rollout)
            dropped.append(max(len(demo) - keep, 0))
            prompt = teacher_text(QUESTIONS[g], ANSWERS[g], demo[:keep])
        else:
            dropped.append(0)
        assert len(prompt) + len(rollout) <= max_len
        R = len(rollout)
        np.testing.assert_array_equal(student.response_mask[b], np.arange(student.response_mask.shape[1]) < R)
        np.testing.assert_allclose(got_teacher[b, :R], single_logprobs(reference, prompt, rollout), atol=1e-5, rtol=0)
        np.testing.assert_allclose(
            got_student[b, :R], single_logprobs(reference, student_text(QUESTIONS[g]), rollout), atol=1e-5, rtol=0
        )
    np.testing.assert_array_equal(teacher.demo_tokens_dropped, dropped)
    assert teacher.num_truncated == np.count_nonzero(dropped) and 1 <= np.count_nonzero(dropped) < 5

    with pytest.raises(ValueError, match="max_len"):
        hs.build_teacher_batch(TT, questions, rollouts, mode="answer", answers=answers, max_len=20)


def test_gather_positions_matches_numpy_indexing():
    hidden = np.random.default_rng(0).normal(size=(2, 7, 3)).astype(np.float32)
    index = np.array([[0, 3, 6], [2, 2, 5]])
    expected = np.stack([hidden[b, index[b]] for b in range(2)])
    np.testing.assert_array_equal(hs.gather_positions(jnp.asarray(hidden), jnp.asarray(index)), expected)


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------


def test_divergence_position_on_hand_made_pairs():
    assert hs.divergence_position([1, 2, 3, 4], [1, 2, 3, 9, 9]) == 3  # shared prefix of 3
    assert hs.divergence_position([5, 2, 3], [1, 2, 3]) == 0  # immediate divergence
    assert hs.divergence_position([1, 2], [1, 2, 3, 4]) == 2  # a prefix: length of the shorter
    assert hs.divergence_position([1, 2, 3, 4], [1, 2]) == 2
    assert hs.divergence_position([7, 8, 9], [7, 8, 9]) == 3  # identical
    assert hs.divergence_position([], [1]) == 0
    rollouts = [[1, 2, 3], [1, 5, 3], [4], [4]]
    np.testing.assert_array_equal(hs.divergence_positions(rollouts, np.array([[1, 0], [-1, 0]])), [1, 1, -1, 1])


def test_token_credit_masks():
    teacher, student = jnp.array([[-1.0, -2.0, -3.0]]), jnp.array([[-1.5, -1.0, -9.0]])
    got = hs.token_credit(teacher, student, jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(got, [[0.5, -1.0, 0.0]])


def test_credit_mass_share_and_profile_against_loops():
    rng = np.random.default_rng(1)
    B, T = 5, 40
    mask = (np.arange(T)[None] < rng.integers(10, T, B)[:, None]).astype(np.float32)
    credit = rng.normal(size=(B, T)) * mask
    tau = np.array([3, 0, 20, -1, 12])
    rows = np.array([True, True, True, False, True])
    shares = hs.credit_mass_share(credit, tau, rows, windows=(0, 2, 8, 100))
    for w, share in shares.items():
        near = total = 0.0
        for b in range(B):
            if rows[b]:
                for t in range(T):
                    total += abs(credit[b, t])
                    near += abs(credit[b, t]) if abs(t - tau[b]) <= w else 0.0
        assert share == pytest.approx(near / total, rel=1e-12), w
    assert shares[100] == pytest.approx(1.0)

    profile = hs.credit_profile(credit, mask, tau, rows, radius=4)
    for k, offset in enumerate(range(-4, 5)):
        values = [abs(credit[b, tau[b] + offset]) for b in range(B)
                  if rows[b] and 0 <= tau[b] + offset < T and mask[b, tau[b] + offset]]
        assert profile.count[k] == len(values)
        assert profile.mean_abs[k] == pytest.approx(np.mean(values)) if values else np.isnan(profile.mean_abs[k])


def test_coverage_against_simulation_and_formula():
    rng = np.random.default_rng(2)
    G = 8
    for p in (0.1, 0.25, 0.6):
        rewards = (rng.random((20000, G)) < p).astype(np.float32)
        loop = np.mean([r[i] == 0 and any(r[j] == 1 for j in range(G) if j != i)
                        for r in rewards[:500] for i in range(G)])
        assert hs.coverage(rewards[:500]) == pytest.approx(loop, abs=1e-12)
        assert hs.coverage(rewards) == pytest.approx(hs.coverage_formula(p, G), abs=0.01)
    grid = np.linspace(0, 1, 100001)
    p_star = 1 - G ** (-1 / (G - 1))  # 0.257 for G = 8, where f = (1 - p*)(1 - 1/G) = 0.650
    assert grid[np.argmax(hs.coverage_formula(grid, G))] == pytest.approx(p_star, abs=1e-4)
    assert hs.coverage_formula(p_star, G) == pytest.approx((1 - p_star) * (1 - 1 / G), abs=1e-12)


def test_divergence_metrics_combines_the_pieces():
    rollouts = [[1, 2, 3, 4], [1, 2, 9, 9], [5, 5], [6, 6]]  # 2 groups of 2
    rewards = np.array([[0, 1], [0, 0]])
    peers = hs.select_peers(rewards, "first")
    credit = np.array([[0, 0, 3, 1], [1, 1, 1, 1], [2, 2, 0, 0], [9, 9, 0, 0]], np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    metrics = hs.divergence_metrics(rewards, rollouts, peers, credit, mask)
    assert metrics["coverage"] == 0.25  # only rollout 0 fails with a successful peer (tau = 2)
    assert metrics["coverage_formula"] == pytest.approx(0.75 * (1 - 0.75))
    assert metrics["credit_mass_w2"] == 1.0
    assert metrics["credit_mass_w4"] == 1.0


def test_plot_credit_profile_writes_png(tmp_path):
    rng = np.random.default_rng(3)
    credit, mask = rng.normal(size=(4, 30)), np.ones((4, 30))
    tau, rows = np.array([5, 10, 15, 20]), np.ones(4, bool)
    path = tmp_path / "profile.png"
    hs.plot_credit_profile(path, {"HSD": hs.credit_profile(credit, mask, tau, rows, radius=8)})
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
