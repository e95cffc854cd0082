"""Code RL like the paper: the unit-test bundle as HSD's reference for code rows, per-row scoring
of mixed math/code batches, the toy code task, and the `data.mixture` of kinds per step."""
import json

import numpy as np
import pytest

from hsd_jax import rollout, validation
from hsd_jax.rewards import code
from tests.test_configs import ROOT, config_of, rejected


class CharTokenizer:
    """One token per character: token counts are string lengths, easy to check by hand."""

    def encode(self, text):
        return [ord(ch) for ch in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


STDIO = {"inputs": ["21\n", "5\n"], "outputs": ["42\n", "10\n"]}
THREE = {"inputs": ["1\n", "1\n", "1\n"], "outputs": ["2\n", "2\n", "2\n"]}
ONE_TEST = "Input:\n1\nExpected output:\n2"  # 27 characters


def render(tests, max_tokens, fn_name=None, count=len):
    return code.render_tests(code.normalize_tests(tests, fn_name), max_tokens, count)


def test_stdin_tests_render_as_input_and_expected_output():
    assert render(STDIO, 1000) == "Input:\n21\nExpected output:\n42\n\nInput:\n5\nExpected output:\n10"


def test_function_call_tests_render_as_assert_lines():
    assert render({"fn_name": "add", "inputs": [[1, 2], [-3, 3]], "outputs": [3, 0]}, 1000) == (
        "assert add(1, 2) == 3\nassert add(-3, 3) == 0")
    # LiveCodeBench style: JSON text values, one argument per line
    tests = [{"input": '"bob"\n2', "output": '"bobbob"', "testtype": "functional"},
             {"input": '[1, null]\ntrue', "output": "[true]", "testtype": "functional"}]
    assert render(json.dumps(tests), 1000, fn_name="f") == (
        "assert f('bob', 2) == 'bobbob'\nassert f([1, None], True) == [True]")


@pytest.mark.parametrize("budget,expected", [
    (85, "\n\n".join([ONE_TEST] * 3)),  # 27 * 3 + 2 * 2 characters: all fit, no note
    (84, "\n\n".join([ONE_TEST] * 2) + "\n\n(1 of 3 tests not shown)"),  # 82 characters
    (82, "\n\n".join([ONE_TEST] * 2) + "\n\n(1 of 3 tests not shown)"),
    (81, ONE_TEST + "\n\n(2 of 3 tests not shown)"),  # 53 characters
    (53, ONE_TEST + "\n\n(2 of 3 tests not shown)"),
    (52, "(3 of 3 tests not shown)"),
])
def test_whole_tests_are_cut_to_the_token_budget_and_the_rest_counted(budget, expected):
    assert render(THREE, budget) == expected
    assert len(render(THREE, budget)) <= budget or budget < 24


def test_tests_after_the_first_that_does_not_fit_are_never_tokenized():
    tests = {"inputs": ["1\n", "x" * 500 + "\n", "SECRET\n"], "outputs": ["2\n", "y\n", "z\n"]}
    counted = []
    text = render(tests, 100, count=lambda t: counted.append(t) or len(t))
    assert text == ONE_TEST + "\n\n(2 of 3 tests not shown)"
    assert not any("SECRET" in t for t in counted)


def test_reference_tokens_are_the_answer_or_the_rendered_tests():
    tokenizer = CharTokenizer()
    examples = [{"question": "1 + 1?", "answer": "2", "kind": "math"},
                {"question": "double it", "tests": json.dumps(STDIO), "kind": "code"},
                {"question": "double it", "tests": STDIO, "solution": "print(2 * int(input()))"}]
    references, solutions = rollout.reference_tokens(tokenizer, examples, max_tests_tokens=58)  # all 59, one + note 55
    assert [tokenizer.decode(r) for r in references] == [
        "2", "Input:\n21\nExpected output:\n42\n\n(1 of 2 tests not shown)",
        "Input:\n21\nExpected output:\n42\n\n(1 of 2 tests not shown)"]
    assert solutions[:2] == [None, None] and tokenizer.decode(solutions[2]) == "print(2 * int(input()))"


def code_config(tmp_path, **overrides):
    """configs/tiny.py on the example code rows, with a 64-token tests budget."""
    fields = dict(data__kind="code", data__train_files=str(ROOT / "examples" / "code.jsonl"), tokenizer_path=str(tmp_path),
                  hindsight__max_tests_tokens=64, hindsight__max_teacher_len=320)
    return config_of("tiny", None, tmp_path, **{**fields, **overrides})


@pytest.mark.parametrize("variant", ["hsd", "opsd"])
def test_answer_contexts_validate_for_code(variant, tmp_path):
    config = validation.resolve(code_config(tmp_path, loss__name=variant))
    validation.validate(config)
    assert config.hindsight.context in ("answer", "peer_answer")


def test_teacher_length_must_hold_the_tests_budget_for_code(tmp_path):
    config = code_config(tmp_path, hindsight__max_tests_tokens=100)
    config.hindsight.max_teacher_len = config.data.max_prompt_len + config.sampling.max_new_tokens + 64 + 99
    rejected(config, "config.hindsight.max_teacher_len", "hindsight.max_tests_tokens")
    config.hindsight.max_teacher_len += 1
    validation.validate(validation.resolve(config))
    rejected(code_config(tmp_path, hindsight__max_tests_tokens=0), "config.hindsight.max_tests_tokens=0")


# Only the trusted programs below run in the sandbox; where it would keep the tester's uid the test
# opts in, as tests/test_rewards_code.py does, with small limits.
LIMITS = code.SandboxLimits(timeout_s=30.0, memory_bytes=256 << 20, max_processes=8, max_output_bytes=1 << 20,
                            allow_same_uid=code.runs_as_caller(code.sandbox_isolation()))
DOUBLE = "```python\nprint(2 * int(input()))\n```"
TRIPLE = "```python\nprint(3 * int(input()))\n```"


def test_mixed_batches_score_each_row_with_its_kinds_verifier():
    from hsd_jax.rewards import Scorer

    rows = [{"question": "3 + 4?", "answer": "7", "kind": "math"},
            {"question": "double it", "tests": STDIO, "kind": "code"},
            {"question": "2 * 4?", "answer": "8", "kind": "math"},
            {"question": "double it", "tests": STDIO, "kind": "code"}]
    completions = [r"\boxed{7}", r"\boxed{6}", DOUBLE, TRIPLE, r"\boxed{8}", r"\boxed{8}", "no code", DOUBLE]
    truncated = np.array([False, False, False, False, True, False, False, True])
    with Scorer(("toy", "code"), num_workers=2, code_limits=LIMITS) as mixed:
        rewards, reasons = mixed(rows, completions, truncated=truncated)  # G = 2 completions per row
    expected = []  # a per-row loop over single-kind scorers
    with Scorer("toy") as toy, Scorer("code", num_workers=1, code_limits=LIMITS) as coder:
        for b, completion in enumerate(completions):
            row = {k: v for k, v in rows[b // 2].items() if k != "kind"}
            single = toy if "answer" in row else coder
            expected.append((0.0, "truncated") if truncated[b] else tuple(x[0] for x in single([row], [completion])))
    assert list(zip(rewards.tolist(), reasons)) == expected
    assert reasons == ["correct", "wrong", "correct", "wrong", "truncated", "correct", "no_answer", "truncated"]


def test_rows_need_a_kind_the_scorer_verifies():
    from hsd_jax.rewards import Scorer

    with Scorer("toy") as toy:
        assert toy([{"answer": "7"}], [r"\boxed{7}"])[1] == ["correct"]  # one verifier: no kind needed
        with pytest.raises(ValueError, match="kind 'code'"):
            toy([{"tests": STDIO, "kind": "code"}], [DOUBLE])
    with pytest.raises(ValueError, match="one verifier per row kind"):
        Scorer(("math", "toy"))


def test_toy_code_problems_are_deterministic_and_their_solutions_pass_their_tests(tmp_path):
    import random
    import re

    from hsd_jax import data

    path = data.write_toy_dataset(str(tmp_path / "code.jsonl"), 6, seed=3, problem=data.toy_code_problem)
    rows, stats = data.load_rows(path, "code")
    again, _ = data.load_rows(data.write_toy_dataset(str(tmp_path / "again.jsonl"), 6, seed=3,
                                                     problem=data.toy_code_problem), "code")
    assert rows == again and stats.kept == 6 and not stats.skipped
    assert rows != data.load_rows(data.write_toy_dataset(str(tmp_path / "other.jsonl"), 6, seed=4,
                                                         problem=data.toy_code_problem), "code")[0]
    for row in rows:  # expected outputs by Python's own arithmetic
        expr = re.fullmatch(r"Read an integer n and print (.*)\.", row["question"]).group(1)
        for stdin, stdout in zip(row["tests"]["inputs"], row["tests"]["outputs"]):
            assert stdout == f"{eval(expr, {'n': int(stdin)})}\n"
    verifier = code.CodeVerifier(2, limits=LIMITS)
    assert verifier([r["solution"] for r in rows], [r["tests"] for r in rows]) == [(1.0, "correct")] * 6
    doubling = verifier([DOUBLE] * 6, [r["tests"] for r in rows])
    assert any(reward == 0.0 for reward, _ in doubling)
    assert data.toy_code_problem(random.Random(0)) == data.toy_code_problem(random.Random(0))
