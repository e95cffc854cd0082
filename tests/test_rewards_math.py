"""Math verifier: extraction, symbolic equivalence, hard deadlines, and the batched `score` entry."""
import os
import time

import numpy as np
import pytest

from hsd_jax.rewards import Scorer, align_rows, score
from hsd_jax.rewards._pool import TimeoutPool
from hsd_jax.rewards.math import MathVerifier, exact_match, extract_answer, normalize_answer

TIMEOUT_S = 1.0  # for the pathological inputs; the default (5 s) for the rest


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2) as v:
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


def test_pathological_inputs_return_within_the_deadline():
    completions = [
        r"\boxed{9^{9^{9}}}",
        r"\boxed{9**9**9}",
        r"\boxed{" + r"\frac{" * 2000 + "1" + "}{2}" * 2000 + "}",
        "x" * 1_000_000 + r"\boxed{" + "9" * 1_000_000 + "}",
    ]
    with MathVerifier(num_workers=len(completions), timeout_s=TIMEOUT_S) as verifier:
        verifier.wait_ready()
        start = time.monotonic()
        results = verifier(completions, ["1"] * len(completions))
        elapsed = time.monotonic() - start
        # The pool survived: replaced workers still verify correctly.
        assert verifier([r"\boxed{\frac{1}{2}}"], ["0.5"]) == [(1.0, "correct")]
    assert all(reward == 0.0 for reward, _ in results)
    assert {reason for _, reason in results} <= {"wrong", "timeout", "error", "no_answer"}
    # One warm worker per check: one round of deadlines (killed workers are replaced in the
    # background), plus slack for extracting from the 1 MB strings on a loaded CI machine.
    assert elapsed < TIMEOUT_S + 5


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
                             num_workers=1)
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
