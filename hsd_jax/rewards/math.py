"""Math answer verification: extract the final answer, decide equivalence with a deadline.

Extraction (`extract_answer`): the text after the last `</think>` (the whole text if there is
none); in it the content of the last `\\boxed{...}` (nested braces matched; `\\fbox` too), or else
the last number; linear time in the length of the completion. Equivalence: the normalised
strings are equal, or `math_verify` parses both sides and `verify`s them symbolically.
`MathVerifier` does all of it, extraction included, in a `TimeoutPool` worker with a hard
per-completion deadline (5 s default), so no model output is parsed in the trainer's process:
sympy can hang in C code where no signal is delivered, so a late worker is SIGKILLed and
replaced. math_verify's own SIGALRM timeouts are switched off in the workers
(`parsing_timeout=None`, `timeout_seconds=None`); the pool's deadline replaces them.

Reasons returned with each reward: "correct", "wrong", "no_answer" (nothing extracted),
"timeout" (the check passed its deadline), "error" (the worker process died).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence

from hsd_jax.rewards._pool import TimeoutPool

_THINK_END = "</think>"
_BOX_TOKEN = re.compile(r"\\boxed|\\fbox|[{}]")  # the tokens `last_boxed` reads
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\s+")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def final_segment(text: str) -> str:
    """The part of a completion after its last `</think>` (the whole text if there is none)."""
    _head, sep, tail = text.rpartition(_THINK_END)
    return tail if sep else text


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`) in `text`.

    "Last" is by the command's position; a group whose braces never close is skipped, as is a
    command followed by anything but `{` or a space. Nested braces are matched. One left-to-right
    pass over the commands and braces with a stack of open braces: O(len(text)) for any input.
    """
    best = -1  # start of the last usable command so far
    best_span: tuple[int, int] | None = None  # its content text[i:j]; None for the `\\boxed 5` form
    open_braces: list[tuple[int, int]] = []  # (position after "{", start of its command or -1)
    owner = -1  # start of the command whose "{" is the next token
    last_visible = len(text.rstrip())  # a spaced command needs a non-space at or after its arg
    for match in _BOX_TOKEN.finditer(text):
        token, pos = match.group(), match.start()
        if token == "{":
            open_braces.append((match.end(), owner))
            owner = -1
        elif token == "}":
            if open_braces:
                content_start, command = open_braces.pop()
                if command > best:
                    best, best_span = command, (content_start, pos)
        else:
            arg = match.end()
            follower = text[arg:arg + 1]
            if follower == "{":
                owner = pos
            elif follower == " " and arg < last_visible:
                best, best_span = pos, None
    if best < 0:
        return None
    if best_span is not None:
        return text[best_span[0]:best_span[1]].strip()
    arg = best + (len("\\boxed") if text.startswith("\\boxed", best) else len("\\fbox"))
    return text[arg:].split(maxsplit=1)[0].rstrip("$.")


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


def _verdict(predicted: str | None, answer: str) -> tuple[float, str] | None:
    """The verdict that needs no symbolic check: no answer, or normalised strings equal."""
    if predicted is None:
        return 0.0, "no_answer"
    if normalize_answer(predicted) == normalize_answer(answer):
        return 1.0, "correct"
    return None


def exact_match(completion: str, answer: str) -> tuple[float, str]:
    """In-process check by normalised string equality only (the toy task's verifier)."""
    return _verdict(extract_answer(completion), answer) or (0.0, "wrong")


def check_completion(completion: str, answer: str) -> tuple[float, str]:
    """`(reward, reason)` of a completion against a reference answer: extraction, normalised
    equality, then `symbolic_equal`; WITHOUT any timeout, so run it in a `TimeoutPool` worker
    (as `MathVerifier` does): every step parses model output."""
    predicted = extract_answer(completion)
    verdict = _verdict(predicted, answer)
    if verdict is not None:
        return verdict
    return (1.0, "correct") if symbolic_equal(predicted, answer) else (0.0, "wrong")


class MathVerifier:
    """Batched math verifier over a pool of `num_workers` processes (default: all cores).

    `verifier(completions, answers)` returns one `(reward, reason)` per completion, reward 1.0
    iff its extracted answer is equivalent to the reference answer. Each completion is checked
    by `check_completion` in a worker, extraction included, with `timeout_s` of wall clock; a
    worker's address space is capped at `memory_limit_bytes`. Start it once per run (the workers
    take seconds to import sympy) and `close()` it.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0,
                 memory_limit_bytes: int | None = 4 << 30):
        self._pool = TimeoutPool(check_completion, num_workers or os.cpu_count() or 1,
                                 timeout_s, initializer=_init_worker,
                                 memory_limit_bytes=memory_limit_bytes)

    def __call__(self, completions: Sequence[str],
                 answers: Sequence[str]) -> list[tuple[float, str]]:
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions but {len(answers)} answers; "
                             "pass one reference answer per completion")
        results = self._pool.map(list(zip(completions, answers)))
        return [value if status == "ok" else (0.0, status) for status, value in results]

    def wait_ready(self) -> None:
        """Blocks until all workers are warm (they start in the background on creation)."""
        self._pool.wait_ready()

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
