"""evaluate.py: pass@k against a brute-force enumeration of all k-subsets; eval-file specs and
their sampler settings, per-set and overall metrics by hand, greedy decoding against an argmax
loop that re-runs the whole sequence, and the evaluation of scripted sets."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hsd_jax import data, evaluate, sampling
from models import hf
from tests.hf_reference import make_checkpoint


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 6, 2), (8, 1, 8)])
def test_pass_at_k_equals_subset_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    expected = sum(any(s) for s in subsets) / len(subsets)
    assert evaluate.pass_at_k(n, c, k) == pytest.approx(expected)


def test_summarize_hand_computed():
    rewards = np.array([[1, 0, 0, 1], [0, 0, 0, 0]])
    metrics = evaluate.summarize(rewards, ks=(1, 2))
    assert metrics["avg@4"] == pytest.approx(0.25)
    assert metrics["pass@1"] == pytest.approx(0.25)
    assert metrics["pass@2"] == pytest.approx((1 - 1 / 6) / 2)


def test_bad_k_is_an_error():
    with pytest.raises(ValueError, match="k=5"):
        evaluate.pass_at_k(4, 1, 5)


RUN_SAMPLING = sampling.SamplingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=20, n=8, eos_ids=(3,))


def test_eval_files_spec_parses_each_entry_and_its_decoding():
    sets = evaluate.parse_eval_files(" data/aime.jsonl:avg@16, he.jsonl:greedy,,dev.parquet , c:/x/odd:name.jsonl", 4)
    assert sets == [
        evaluate.EvalSet("data/aime.jsonl", "aime", "avg", 16),
        evaluate.EvalSet("he.jsonl", "he", "greedy", 1),
        evaluate.EvalSet("dev.parquet", "dev", "run", 4),
        evaluate.EvalSet("c:/x/odd:name.jsonl", "odd:name", "run", 4),  # a ':' inside the path is kept
    ]
    assert evaluate.parse_eval_files("", 4) == []
    assert evaluate.parse_eval_files("code=he.jsonl:greedy, math=m.jsonl, x=y.jsonl:avg@2", 4, "code") == [
        evaluate.EvalSet("he.jsonl", "he", "greedy", 1, "code"),
        evaluate.EvalSet("m.jsonl", "m", "run", 4, "math"),
        evaluate.EvalSet("x=y.jsonl", "x=y", "avg", 2, "code"),  # not a kind: part of the path, the default kind
    ]


@pytest.mark.parametrize("spec,match", [("a.jsonl:best@3", "unknown decoding 'best@3'"),
                                        ("a.jsonl:avg@0", "unknown decoding 'avg@0'"),
                                        ("x/a.jsonl,y/a.jsonl:greedy", "share the name 'a'")])
def test_bad_eval_files_spec_names_the_entry(spec, match):
    with pytest.raises(ValueError, match=match):
        evaluate.parse_eval_files(spec, 4)


def test_decodings_set_the_sampler_as_the_paper_evaluates():
    avg, greedy, run = (evaluate.EvalSet("f", "f", d, n) for d, n in (("avg", 16), ("greedy", 1), ("run", 4)))
    assert avg.sampling_config(RUN_SAMPLING) == dataclasses.replace(RUN_SAMPLING, n=16, temperature=1.0, top_p=1.0, top_k=0)
    assert greedy.sampling_config(RUN_SAMPLING) == dataclasses.replace(RUN_SAMPLING, n=1, temperature=0.0)
    assert run.sampling_config(RUN_SAMPLING) == dataclasses.replace(RUN_SAMPLING, n=4)


def test_summarize_lengths_truncation_and_ks_beyond_n():
    rewards = np.array([[1, 0], [0, 0], [1, 1]])
    lengths = np.array([[3, 5], [7, 7], [1, 2]])
    truncated = np.array([[0, 0], [1, 1], [0, 0]])
    assert evaluate.summarize(rewards, (1, 2, 4), lengths, truncated) == pytest.approx(
        {"avg@2": 0.5, "pass@1": 0.5, "pass@2": (1 + 0 + 1) / 3, "response_length": 25 / 6, "truncated": 2 / 6})


def test_overall_weights_questions_and_keeps_the_ks_every_set_has():
    a = dict(rewards=np.array([[1, 0, 0, 1], [0, 0, 0, 0]]), lengths=np.full((2, 4), 4), truncated=np.zeros((2, 4)))
    b = dict(rewards=np.array([[1], [1], [0]]), lengths=np.array([[10], [20], [30]]), truncated=np.array([[0], [0], [1]]))
    assert evaluate.overall([a, b], ks=(1, 2)) == pytest.approx(
        {"accuracy": (0.5 + 0 + 1 + 1 + 0) / 5, "pass@1": (0.5 + 0 + 1 + 1 + 0) / 5,
         "response_length": (8 * 4 + 60) / 11, "truncated": 1 / 11})


def argmax_continuations(model, prompts, max_new_tokens, eos_ids):
    """Greedy decoding by hand: each whole sequence re-run at every step (right-padded to one width,
    which a causal model does not see), the argmax of the logits at its last token appended."""
    graphdef, params = nnx.split(model)
    width = max(map(len, prompts)) + max_new_tokens
    logits_of = jax.jit(lambda tokens: (lambda m: m.logits(m(tokens, jnp.arange(width)[None])[0]))(
        nnx.merge(graphdef, params)))
    continuations = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            logits = logits_of(jnp.asarray([tokens + [0] * (width - len(tokens))]))
            tokens.append(int(np.argmax(np.asarray(logits[0, len(tokens) - 1]))))
            if tokens[-1] in eos_ids:
                break
        continuations.append(tokens[len(prompt):])
    return continuations


def test_greedy_eval_set_decodes_the_argmax_continuation(tmp_path):
    make_checkpoint(tmp_path)
    model = hf.load_model(tmp_path)
    prompts = [[5, 9, 11], [7], [12, 13, 14, 15, 16, 17]]
    first_after_7 = argmax_continuations(model, [[7]], 1, ())[0][0]
    eos = (first_after_7,)  # so that prompt [7] stops at once: the stop is exercised
    cfg = evaluate.EvalSet("f", "f", "greedy", 1).sampling_config(dataclasses.replace(RUN_SAMPLING, eos_ids=eos))
    expected = argmax_continuations(model, prompts, cfg.max_new_tokens, eos)
    assert expected[1] == [first_after_7] and len(expected[0]) > 1
    graphdef, params = nnx.split(model)
    for seed in (0, 1):  # the key plays no part
        out = sampling.generate(graphdef, params, prompts, jax.random.key(seed), cfg)
        assert [list(np.asarray(out.tokens[r, : out.lengths[r]])) for r in range(len(prompts))] == expected
        assert list(np.asarray(out.truncated)) == [e[-1] not in eos for e in expected]


class ScriptedPolicy:
    """A rollout.Policy stand-in: rows of `lengths[question]` tokens, truncated where scripted."""

    def __init__(self, tokenizer, lengths, truncated):
        self.tokenizer, self.sampling_cfg, self.calls = tokenizer, RUN_SAMPLING, []
        self.lengths, self.truncated = lengths, truncated

    def sample(self, questions, key, cfg, progress=None):
        self.calls.append((len(questions), cfg.n, cfg.temperature, cfg.top_p))
        rows = [(q, r) for q in range(len(questions)) for r in range(cfg.n)]
        progress(len(questions))
        return sampling.Rollouts(
            tokens=np.full((len(rows), 4), 5, np.int32), logprobs=np.zeros((len(rows), 4), np.float32),
            lengths=np.array([self.lengths[len(self.calls) - 1][q][r] for q, r in rows], np.int32),
            truncated=np.array([self.truncated[len(self.calls) - 1][q][r] for q, r in rows]),
            prompt_index=np.array([q for q, _ in rows], np.int32))


def test_evaluate_reports_each_set_with_its_decoding_and_overall(tmp_path):
    tokenizer = hf.load_tokenizer(data.build_toy_tokenizer(str(tmp_path / "tok")))
    questions = {"a": ["What is 1 + 1?", "What is 2 + 2?"], "b": ["What is 3 + 3?"]}
    verdicts = {"What is 1 + 1?": [1, 0, 1], "What is 2 + 2?": [0, 0, 0], "What is 3 + 3?": [1]}
    sets = [evaluate.EvalSet("a.jsonl", "a", "avg", 3), evaluate.EvalSet("b.jsonl", "b", "greedy", 1)]
    examples_of = lambda eval_set: [{"question": q, "answer": "0"} for q in questions[eval_set.path[0]]]
    policy = ScriptedPolicy(tokenizer, lengths=[[[1, 2, 3], [4, 4, 4]], [[8]]],
                            truncated=[[[0, 0, 0], [1, 0, 0]], [[0]]])

    def scorer(examples, completions, truncated):
        return np.array([v for ex in examples for v in verdicts[ex["question"]]], np.float32), [""] * len(completions)

    bars = []

    class Bar:
        def __init__(self, total, description):
            self.total, self.description, self.done = total, description, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, n):
            self.done += n

    report = evaluate.evaluate(sets, examples_of, policy, scorer, jax.random.key(0), ks=(1, 2), progress=Bar)
    assert policy.calls == [(2, 3, 1.0, 1.0), (1, 1, 0.0, RUN_SAMPLING.top_p)]
    assert report.metrics == pytest.approx({
        "eval/a/avg@3": 2 / 6, "eval/a/pass@1": 2 / 6, "eval/a/pass@2": (1 + 0) / 2,
        "eval/a/response_length": 18 / 6, "eval/a/truncated": 1 / 6,
        "eval/b/avg@1": 1.0, "eval/b/pass@1": 1.0, "eval/b/response_length": 8.0, "eval/b/truncated": 0.0,
        "eval/accuracy": (2 / 3 + 0 + 1) / 3, "eval/pass@1": (2 / 3 + 0 + 1) / 3,
        "eval/response_length": 26 / 7, "eval/truncated": 1 / 7,
    })
    assert [(b.description, b.total, b.done) for b in bars] == [("eval a", 2, 2), ("eval b", 1, 1)]
    assert [(r["name"], r["decoding"], r["questions"], r["temperature"]) for r in report.sets] == [
        ("a", "avg@3 (T=1)", 2, 1.0), ("b", "greedy", 1, 0.0)]
    table = evaluate.format_table(report, ks=(1, 2)).splitlines()
    assert table[0].split() == ["set", "decoding", "questions", "accuracy", "pass@1", "pass@2", "length", "truncated"]
    assert table[3].split() == ["b", "greedy", "1", "1.0000", "1.0000", "-", "8.0", "0.0000"]
    assert table[4].split() == ["overall", "3", "0.5556", "0.5556", "-", "3.7", "0.1429"]
