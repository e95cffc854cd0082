"""Math answer verification: extract the final answer, decide equivalence with a deadline.

Extraction (`extract_answer`): the text after the last `</think>` (the whole text if there is
none); in it the content of the last `\\boxed{...}` (nested braces matched; `\\fbox` too), or else
the last number. Equivalence: the normalised strings are equal (checked in-process, cheap), or
`math_verify` parses both sides and `verify`s them symbolically. The symbolic check runs in a
`TimeoutPool` worker with a hard per-check deadline (5 s default): sympy can hang in C code
where no signal is delivered, so a late worker is SIGKILLed and replaced. math_verify's own
SIGALRM timeouts are switched off in the workers (`parsing_timeout=None`,
`timeout_seconds=None`); the pool's deadline replaces them.

Reasons returned with each reward: "correct", "wrong", "no_answer" (nothing extracted),
"timeout" (the symbolic check passed its deadline), "error" (the worker process died).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence

from hsd_jax.rewards._pool import TimeoutPool

_THINK_END = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def final_segment(text: str) -> str:
    """The part of a completion after its last `</think>` (the whole text if there is none)."""
    _head, sep, tail = text.rpartition(_THINK_END)
    return tail if sep else text


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at `text[start] == "{"`, or None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in `text`."""
    end = len(text)
    while True:
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None
        arg = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
        rest = text[arg:arg + 1]
        if rest == "{":
            content = _braced(text, arg)
            if content is not None:
                return content.strip()
        elif rest == " ":
            token = text[arg:].split(maxsplit=1)
            if token:
                return token[0].rstrip("$.")
        end = start


def last_number(text: str) -> str | None:
    """The last number in `text` (thousands separators removed; `3/4`, `-2.5` kept whole)."""
    match = None
    for match in _NUMBER.finditer(text):
        pass
    return match.group(0).replace(",", "") if match else None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{}` content, else the last number."""
    text = final_segment(completion)
    answer = last_boxed(text)
    if answer is None:
        answer = last_number(text)
    return answer or None


def normalize_answer(answer: str) -> str:
    """Canonical string for the fallback comparison: no `$`, spacing macros, `\\text{}` or
    trailing period; `\\dfrac`/`\\tfrac` -> `\\frac`."""
    s = answer.strip().rstrip(".").strip("$")
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _LATEX_NOISE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


def _init_worker() -> None:
    """Warms a worker up before it reports ready: imports math_verify/sympy and builds the
    LaTeX parser (seconds, which must not count against the first check's deadline)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    symbolic_equal(r"\frac{1}{2}", "0.5")


@functools.lru_cache(maxsize=4096)
def _parse(answer: str):
    from math_verify import parse
    return parse(f"${answer}$", parsing_timeout=None)


def symbolic_equal(predicted: str, gold: str) -> bool:
    """math_verify equivalence of two extracted answers, WITHOUT any timeout: run it in a
    `TimeoutPool` worker (as `MathVerifier` does), never in the trainer's process."""
    from math_verify import verify
    gold_parsed, pred_parsed = _parse(gold), _parse(predicted)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def exact_match(completion: str, answer: str) -> tuple[float, str]:
    """In-process check by normalised string equality only (the toy task's verifier)."""
    predicted = extract_answer(completion)
    if predicted is None:
        return 0.0, "no_answer"
    if normalize_answer(predicted) == normalize_answer(answer):
        return 1.0, "correct"
    return 0.0, "wrong"


class MathVerifier:
    """Batched math verifier over a pool of `num_workers` processes (default: all cores).

    `verifier(completions, answers)` returns one `(reward, reason)` per completion, reward 1.0
    iff its extracted answer is equivalent to the reference answer. Each symbolic check has
    `timeout_s` of wall clock; a worker's address space is capped at `memory_limit_bytes`.
    Start it once per run (the workers take seconds to import sympy) and `close()` it.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0,
                 memory_limit_bytes: int | None = 4 << 30):
        self._pool = TimeoutPool(symbolic_equal, num_workers or os.cpu_count() or 1, timeout_s,
                                 initializer=_init_worker,
                                 memory_limit_bytes=memory_limit_bytes)

    def __call__(self, completions: Sequence[str],
                 answers: Sequence[str]) -> list[tuple[float, str]]:
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers; "
                             "pass one reference answer per completion")
        results: list[tuple[float, str]] = [(0.0, "no_answer")] * len(completions)
        tasks, task_index = [], []
        for i, (completion, gold) in enumerate(zip(completions, answers)):
            predicted = extract_answer(completion)
            if predicted is None:
                continue
            if normalize_answer(predicted) == normalize_answer(gold):
                results[i] = (1.0, "correct")
            else:
                tasks.append((predicted, gold))
                task_index.append(i)
        for i, (status, equal) in zip(task_index, self._pool.map(tasks)):
            if status == "ok":
                results[i] = (1.0, "correct") if equal else (0.0, "wrong")
            else:
                results[i] = (0.0, status)
        return results

    def wait_ready(self) -> None:
        """Blocks until all workers are warm (they start in the background on creation)."""
        self._pool.wait_ready()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
