"""Math verifier: extraction, symbolic equivalence, hard deadlines, and the batched `score` entry."""
import os
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_jax.rewards import Scorer, align_rows, math as math_rewards, score
from hsd_jax.rewards._pool import TimeoutPool
from hsd_jax.rewards.math import (MathVerifier, exact_match, extract_answer, last_boxed,
                                  normalize_answer)

TIMEOUT_S = 1.0  # for the pathological inputs, whose checks are meant to time out
# For checks that must finish: far above their cost, even on a loaded 2-core machine (pytest -n 2).
SLACK_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=SLACK_TIMEOUT_S) as v:
        yield v


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"first \boxed{1}, then \boxed{\{1, \{2\}\}} end", r"\{1, \{2\}\}"),
    (r"\boxed{3} and a broken \boxed{4", "3"),
    (r"\fbox{7}", "7"),
    (r"answer: \boxed 12.", "12"),
    ("it costs 1,250 dollars, not 3", "3"),
    ("the total is 1,250.", "1250"),
    ("ratio 3/4", "3/4"),
    ("<think>maybe \\boxed{1}</think> so it is -2.5", "-2.5"),
    ("no digits here", None),
    (r"\boxed{}", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def reference_last_boxed(text):
    """The specification, checked command by command from the last one back: quadratic, obvious."""
    starts = [m.start() for m in re.finditer(r"\\boxed|\\fbox", text)]
    for start in reversed(starts):
        arg = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
        if text[arg:arg + 1] == "{":
            depth = 0
            for i in range(arg, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[arg + 1:i].strip()
        elif text[arg:arg + 1] == " " and text[arg:].split():
            return text[arg:].split()[0].rstrip("$.")
    return None


BRACE_PIECES = ["\\boxed", "\\fbox", "\\", "boxed", "fbox", "{", "{", "}", "}", " ", "\n", "x",
                "12", "$", "."]


@settings(max_examples=1000)  # cheap examples: many more than the profile default
@given(st.lists(st.sampled_from(BRACE_PIECES), max_size=30).map("".join))
def test_last_boxed_matches_the_reference_on_random_brace_strings(text):
    assert last_boxed(text) == reference_last_boxed(text)


def test_normalize_answer_strips_latex_noise():
    assert normalize_answer(r"$\dfrac{1}{2}$.") == normalize_answer(r"\frac{1}{2}")
    assert normalize_answer(r"\text{Monday}") == "Monday"
    assert normalize_answer(r"\left( 1, 2 \right)") == "(1,2)"


EQUIVALENT = [
    (r"\frac{1}{2}", r"The answer is \boxed{0.5}."),
    (r"\frac{1}{2}", r"\boxed{\dfrac12}"),
    ("1/2", r"\boxed{\frac{2}{4}}"),
    (r"\{1, 2\}", r"\boxed{\{2, 1\}}"),
    (r"(0, 1]", r"\boxed{(0,1]}"),
    (r"[1, \infty)", r"\boxed{[1,\infty)}"),
    (r"5\sqrt{2}", r"\boxed{\sqrt{50}}"),
    ("x^2 + 2x + 1", r"\boxed{(x+1)^2}"),
    ("156", "so 12*13 = 156"),
    (r"\text{Monday}", r"\boxed{\text{Monday}}"),
]
WRONG = [
    (r"\frac{1}{2}", r"\boxed{\frac{1}{3}}"),
    ("[0, 1)", r"\boxed{(0, 1]}"),
    (r"\{1, 2\}", r"\boxed{\{1, 3\}}"),
    ("156", r"\boxed{155}"),
    ("x^2 + 2x + 1", r"\boxed{(x-1)^2}"),
]


def test_equivalent_forms_accepted_and_wrong_rejected(verifier):
    golds = [g for g, _ in EQUIVALENT + WRONG]
    completions = [c for _, c in EQUIVALENT + WRONG]
    results = verifier(completions, golds)
    assert results[:len(EQUIVALENT)] == [(1.0, "correct")] * len(EQUIVALENT)
    assert results[len(EQUIVALENT):] == [(0.0, "wrong")] * len(WRONG)


def test_no_answer(verifier):
    assert verifier(["I don't know.", ""], ["1", "2"]) == [(0.0, "no_answer")] * 2


def test_many_unclosed_boxes_are_verified(verifier):
    unclosed = (r"\boxed{" + "x" * 23) * 2000
    assert len(unclosed) == 60_000
    completions = [unclosed, r"\boxed{7} " + unclosed, unclosed + " so 7"]
    assert verifier(completions, ["7"] * 3) == [(0.0, "no_answer"), (1.0, "correct"),
                                                 (1.0, "correct")]


def test_model_output_is_parsed_only_in_the_workers(verifier, monkeypatch):
    """The workers (spawned, so they import the module afresh) parse; this process must not."""
    def parsed_here(*args):
        raise AssertionError(f"model output parsed in the calling process: {args!r:.80}")

    for name in ("final_segment", "last_boxed", "last_number", "extract_answer",
                 "normalize_answer"):
        monkeypatch.setattr(math_rewards, name, parsed_here)
    assert verifier([r"\boxed{7}", "none", r"\boxed{0.5}"], ["7", "7", r"\frac12"]) == [
        (1.0, "correct"), (0.0, "no_answer"), (1.0, "correct")]


def test_pathological_inputs_score_zero_and_the_pool_survives():
    completions = [
        r"\boxed{9^{9^{9}}}",
        r"\boxed{9**9**9}",
        r"\boxed{" + r"\frac{" * 2000 + "1" + "}{2}" * 2000 + "}",
        "x" * 1_000_000 + r"\boxed{" + "9" * 1_000_000 + "}",
    ]
    with MathVerifier(num_workers=len(completions), timeout_s=TIMEOUT_S) as verifier:
        verifier.wait_ready()
        results = verifier(completions, ["1"] * len(completions))
        # The pool survived: replaced workers still verify correctly.
        assert verifier([r"\boxed{\frac{1}{2}}"], ["0.5"]) == [(1.0, "correct")]
    assert all(reward == 0.0 for reward, _ in results)
    assert {reason for _, reason in results} <= {"wrong", "timeout", "error", "no_answer"}


def _sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_timeout_pool_kills_and_replaces_a_hung_worker():
    with TimeoutPool(_sleep_then_pid, num_workers=1, timeout_s=0.5) as pool:
        [(status, first_pid)] = pool.map([(0.0,)])
        assert status == "ok"
        assert pool.map([(60.0,)]) == [("timeout", None)]
        [(status, second_pid)] = pool.map([(0.0,)])
        assert status == "ok" and second_pid != first_pid
        with pytest.raises(ProcessLookupError):
            os.kill(first_pid, 0)


def test_exact_match_is_the_toy_verifier():
    assert exact_match(r"3 + 4 = 7\nThe answer is \boxed{7}.", "7") == (1.0, "correct")
    assert exact_match(r"\boxed{8}", "7") == (0.0, "wrong")
    assert exact_match("no idea", "7") == (0.0, "no_answer")


def test_score_math_honours_truncation_and_groups():
    rows = [{"answer": "\\frac{1}{2}"}, {"answer": "3"}]
    completions = [r"\boxed{0.5}", r"\boxed{1/2}", r"\boxed{3}", "no answer"]
    rewards, reasons = score(rows, completions, "math", truncated=[False, True, False, False],
                             num_workers=1, math_timeout_s=SLACK_TIMEOUT_S)
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, [1.0, 0.0, 1.0, 0.0])
    assert reasons == ["correct", "truncated", "correct", "no_answer"]


def test_scorer_toy_and_input_errors():
    with Scorer("toy") as scorer:
        rewards, reasons = scorer([{"answer": "7"}] * 2, [r"\boxed{7}", r"\boxed{6}"])
    np.testing.assert_array_equal(rewards, [1.0, 0.0])
    assert reasons == ["correct", "wrong"]
    with pytest.raises(ValueError, match="kind"):
        Scorer("poetry")
    with pytest.raises(ValueError, match="3 completions for 2 rows"):
        align_rows([{}, {}], 3)
    with Scorer("toy") as scorer, pytest.raises(ValueError, match="'answer'"):
        scorer([{"question": "q"}], ["x"])
    with Scorer("toy") as scorer, pytest.raises(ValueError, match="truncated"):
        scorer([{"answer": "1"}], ["x"], truncated=[True, False])
