"""Prompt datasets: local JSONL/Parquet rows -> validated rows -> chat prompts -> grain batches.

Schemas (one JSON object per JSONL line, or one Parquet row):
- math: `{"question": str, "answer": str | number, "solution": str (optional)}`
- code: `{"question": str, "tests": tests, "fn_name": str (optional), "solution": str (optional)}`,
  `tests` in a format `hsd_jax.rewards.code.normalize_tests` accepts (APPS or LiveCodeBench style).
A row that fails validation (including a JSONL line that is not valid UTF-8 or JSON) is skipped
and counted by reason in `DataStats` (and logged), never raised; so is a prompt longer than
`max_prompt_len` tokens. What does raise, naming the file: a missing file, an unknown format,
and (`check_files`, meant to run before model setup) a file without a single valid row.
`prompt_examples` gives the examples a run uses (valid, short enough); `prompt_dataset` batches
them; `mixture_dataset` batches several kinds, each step holding each kind's share of the rows
(`mixture_counts`).

An example (what a batch holds, a list of `batch_size` of them) is the validated row plus
`"kind"` ("math" or "code"), `"prompt"` (the rendered text, with the kind's instruction) and
`"prompt_ids"` (list[int]); treat it as read-only. Batches come
from a grain pipeline: all examples shuffled by seed, repeated for `num_epochs` (None: forever,
reshuffled every epoch), cut into global batches of `batch_size x process_count` with the
remainder dropped, and each global batch split into contiguous per-process slices (process p
takes examples p * batch_size ... (p + 1) * batch_size - 1). So N processes train on exactly the
batches of one process, in the same row order as the global arrays they build. `iter(dataset)` has `get_state()` / `set_state()`: restoring a state taken
after N batches yields exactly the batches an uninterrupted iterator yields after N.

The toy task (`toy_problem`, `write_toy_dataset`, `build_toy_tokenizer`) is the embedded
arrow-walk task of `configs/tiny.py` (follow 8 arrows of a table, one per solution line, each
arrow one token; its walks with slips, `toy_walk`, feed the warm-up), with
disjoint train and held-out splits (`toy_split`): no downloads, verified by
`hsd_jax.rewards.math.exact_match`. Its code twin (`toy_code_problem`) asks for a two-line
program with stdin/stdout tests, verified in the code sandbox.
"""
from __future__ import annotations

import collections
import dataclasses
import fractions
import json
import logging
import os
import random
import re
import string
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from hsd_jax.rewards.code import normalize_tests

logger = logging.getLogger(__name__)

KINDS = ("math", "code")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = ("Write a complete Python 3 solution (the requested function, or a program "
                    "reading stdin and writing stdout) in a single ```python code block.")
_INSTRUCTIONS = {"math": MATH_INSTRUCTION, "code": CODE_INSTRUCTION}
_SCHEMAS = {"math": '{"question": str, "answer": str | number, "solution": str (optional)}',
            "code": '{"question": str, "tests": tests, "fn_name": str (optional), "solution": str '
                    '(optional)}, tests in APPS or LiveCodeBench format'}


class RowError(ValueError):
    """A dataset row that cannot be used; `reason` is the counter it is skipped under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class DataStats:
    """Counts of a dataset load: rows read, kept, and skipped by reason (with a few samples)."""
    read: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: list[str] = dataclasses.field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{where}: {reason}")

    def add(self, other: DataStats) -> None:
        """Adds the counts (and samples, up to 5) of `other` to these."""
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.samples.extend(other.samples[:5 - len(self.samples)])

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"read {self.read} rows, kept {self.kept}, skipped: {skipped}"


# ---------------------------------------------------------------------------- rows

def _require_text(row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"bad_{field}", f"{field!r} must be a non-empty string, got {value!r:.60}")
    return value


def validate_row(row: Any, kind: str) -> dict:
    """The usable fields of a `kind` row ("math" or "code"); raises RowError saying why not."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"a row must be a JSON object, got {type(row).__name__}")
    clean = {"question": _require_text(row, "question")}
    if kind == "math":
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        clean["answer"] = _require_text({"answer": answer}, "answer")
    elif kind == "code":
        fn_name = row.get("fn_name")
        if fn_name is not None and not isinstance(fn_name, str):
            raise RowError("bad_fn_name", f"'fn_name' must be a string, got {fn_name!r:.60}")
        try:
            normalize_tests(row.get("tests"), fn_name)
        except ValueError as e:
            raise RowError("bad_tests", str(e)) from None
        clean["tests"] = row["tests"]
        if fn_name:
            clean["fn_name"] = fn_name
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if row.get("solution") is not None:
        clean["solution"] = _require_text(row, "solution")
    return clean


def _check_file(path: str) -> None:
    """Raises FileNotFoundError / ValueError naming `path` unless it is a readable data file."""
    if not path.endswith((".jsonl", ".parquet")):
        raise ValueError(f"data file {path!r}: unknown format; use .jsonl (one JSON object per "
                         "line) or .parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")


def _read_records(path: str) -> Iterator[tuple[str, Any, str | None]]:
    """(where, record, None) per row of a .jsonl or .parquet file, or (where, None, reason) per
    unreadable line: "bad_utf8" (each JSONL line is decoded on its own) or "invalid_json".
    `where` is "line N" (JSONL, blank lines counted) or "row N" (Parquet), 1-based."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"row {number}", record, None
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the row
            except UnicodeDecodeError:
                yield f"line {number}", None, "bad_utf8"
                continue
            if line.strip():
                try:
                    yield f"line {number}", json.loads(line), None
                except json.JSONDecodeError:
                    yield f"line {number}", None, "invalid_json"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _paths(paths: str | Sequence[str]) -> list[str]:
    return [paths] if isinstance(paths, str) else list(paths)


def load_rows(paths: str | Sequence[str], kind: str) -> tuple[list[dict], DataStats]:
    """Validated rows of all `paths` in order, and the counts (bad rows skipped, logged).

    Raises FileNotFoundError (a path does not exist) or ValueError (unknown format or kind)
    naming the path, before reading any file."""
    _check_kind(kind)
    paths = _paths(paths)
    for path in paths:
        _check_file(path)
    rows, stats = [], DataStats()
    for path in paths:
        for where, record, error in _read_records(path):
            stats.read += 1
            try:
                if error:
                    raise RowError(error, error)
                rows.append(validate_row(record, kind))
            except RowError as e:
                stats.skip(e.reason, f"{path} {where}")
    stats.kept = len(rows)
    if stats.skipped:
        logger.warning("%s data: %s (first: %s)", kind, stats.summary(), stats.samples)
    return rows, stats


def check_files(paths: str | Sequence[str], kind: str, field: str) -> DataStats:
    """Fails fast on data files a run cannot use: call it before model setup.

    Every file of `paths` (the value of config field `field`, e.g. "config.data.train_files")
    must exist, have a known format and hold at least one valid `kind` row. Returns the counts
    of all files together; raises FileNotFoundError or ValueError starting with `field` and
    naming the file, e.g. "config.data.train_files: /x.jsonl has no valid math row (read 3
    rows, kept 0, skipped: bad_question=3); ...". Reads and validates every row once (no
    tokenizer; the prompt-length filter is `prompt_examples`'s).
    """
    _check_kind(kind)
    paths = _paths(paths)
    if not paths:
        raise ValueError(f"{field} is empty; give at least one .jsonl or .parquet file")
    total = DataStats()
    for path in paths:
        try:
            _rows, stats = load_rows(path, kind)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{field}: {e}") from None
        if not stats.kept:
            raise ValueError(f"{field}: {path} has no valid {kind} row ({stats.summary()}); "
                             f"each row must be {_SCHEMAS[kind]}")
        total.add(stats)
    return total


# ---------------------------------------------------------------------------- prompts

def user_content(question: str, kind: str = "math", instruction: str | None = None) -> str:
    """The user turn: the question, a blank line and `instruction` (default: the kind's)."""
    instruction = _INSTRUCTIONS[kind] if instruction is None else instruction
    return f"{question}\n\n{instruction}" if instruction else question


def render_prompt(question: str, tokenizer: Any, kind: str = "math", *,
                  template: str = "chat", enable_thinking: bool = True,
                  instruction: str | None = None) -> str:
    """The prompt text for a question: its `user_content` as the user turn of the tokenizer's
    chat template (`template="chat"`, with `enable_thinking` passed to it, as Qwen3's template
    reads it), or substituted for `{question}` in a plain `template` string."""
    content = user_content(question, kind, instruction)
    if template != "chat":
        if "{question}" not in template:
            raise ValueError(f"template {template!r} has no {{question}} placeholder; "
                             "use \"chat\" or a string containing {question}")
        return template.replace("{question}", content)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template; pass a plain template string "
                         "containing {question} instead of \"chat\"")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def encode_prompts(rows: Sequence[dict], tokenizer: Any, kind: str, *, max_prompt_len: int,
                   stats: DataStats | None = None, **render_kwargs: Any) -> list[dict]:
    """Examples (row + "kind" + "prompt" + "prompt_ids") of the rows whose prompt has at most
    `max_prompt_len` tokens; longer ones are counted in `stats` as "too_long"."""
    examples = []
    for i, row in enumerate(rows):
        prompt = render_prompt(row["question"], tokenizer, kind, **render_kwargs)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_len:
            if stats is not None:
                stats.skip("too_long", f"row {i} ({len(ids)} > {max_prompt_len} tokens)")
            continue
        examples.append({**row, "kind": kind, "prompt": prompt, "prompt_ids": list(ids)})
    if stats is not None:
        stats.kept = len(examples)
    return examples


# ---------------------------------------------------------------------------- pipeline

def prompt_examples(paths: str | Sequence[str], kind: str, tokenizer: Any, *,
                    max_prompt_len: int, template: str = "chat", enable_thinking: bool = True,
                    instruction: str | None = None) -> tuple[list[dict], DataStats]:
    """The examples of `paths` that a run uses, in file order, and the load counts: the rows
    that pass validation (`load_rows`) and whose prompt has at most `max_prompt_len` tokens
    (`encode_prompts`). `prompt_dataset` batches exactly these; use them, not raw `load_rows`
    output, wherever a run reads the same files (evaluation, a supervised warm-up)."""
    rows, stats = load_rows(paths, kind)
    examples = encode_prompts(rows, tokenizer, kind, max_prompt_len=max_prompt_len, stats=stats,
                              template=template, enable_thinking=enable_thinking,
                              instruction=instruction)
    if stats.skipped.get("too_long"):
        logger.warning("%s data: %d prompts longer than %d tokens dropped", kind,
                       stats.skipped["too_long"], max_prompt_len)
    return examples, stats


def mixture_examples(sources: Mapping[str, str | Sequence[str]], tokenizer: Any,
                     **options: Any) -> tuple[list[dict], DataStats]:
    """`prompt_examples` of each kind's files (`sources`: kind -> paths), concatenated in the
    order of `sources`, and their counts added up. `options`: `prompt_examples`' keywords."""
    examples, stats = [], DataStats()
    for kind, paths in sources.items():
        kind_examples, kind_stats = prompt_examples(paths, kind, tokenizer, **options)
        examples += kind_examples
        stats.add(kind_stats)
    return examples, stats


def mixture_counts(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Rows of each kind in a batch of `total`: `total * weight / sum(weights)` rounded by largest
    remainder (ties to the earlier kind), so they add up to `total`; e.g. math:4, code:1 of 128
    -> 102 and 26."""
    if not weights or min(weights.values()) <= 0:
        raise ValueError(f"mixture weights must be positive, got {dict(weights)}")
    shares = {kind: total * w / sum(weights.values()) for kind, w in weights.items()}
    counts = {kind: int(share) for kind, share in shares.items()}
    by_remainder = sorted(shares, key=lambda kind: -(shares[kind] - counts[kind]))  # stable: ties keep order
    for kind in by_remainder[:total - sum(counts.values())]:
        counts[kind] += 1
    return counts


def prompt_dataset(paths: str | Sequence[str], kind: str, tokenizer: Any, **options: Any
                   ) -> tuple[grain.IterDataset, DataStats]:
    """`mixture_dataset` of one kind: batches of `prompt_examples(paths, kind)`; `options` are
    `mixture_dataset`'s keywords."""
    return mixture_dataset({kind: paths}, {kind: 1.0}, tokenizer, **options)


def spread_kinds(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """The rows of `parts` (one list per kind) in one list with every kind spread evenly over it:
    row i of a part of n rows sits at the fraction (2i + 1) / 2n of the list (ties keep the order of
    the parts). So every contiguous slice holds its share of each kind to within one row with two
    kinds (under two rows with three), and a single part comes back as it is."""
    placed = [(fractions.Fraction(2 * i + 1, 2 * len(part)), k, i) for k, part in enumerate(parts) for i in range(len(part))]
    return [parts[k][i] for _, k, i in sorted(placed)]


def mixture_dataset(sources: Mapping[str, str | Sequence[str]], weights: Mapping[str, float], tokenizer: Any, *,
                    batch_size: int, max_prompt_len: int, seed: int = 0, num_epochs: int | None = None,
                    shuffle: bool = True, process_index: int | None = None, process_count: int | None = None,
                    template: str = "chat", enable_thinking: bool = True,
                    instruction: str | None = None) -> tuple[grain.IterDataset, DataStats]:
    """This process's slices (lists of `batch_size` examples) of global batches mixing kinds.

    `sources`: kind -> paths; `weights`: kind -> weight (the same kinds). Every global batch of
    `batch_size x process_count` examples holds `mixture_counts(weights, global size)` of each kind,
    the next ones of that kind's own stream (its `prompt_examples` shuffled by `seed`, repeated for
    `num_epochs`; None: forever, reshuffled every epoch), so the batches are a deterministic
    function of the seed and the step. The kinds are spread evenly over the global batch
    (`spread_kinds`; its order does not depend on the process count), which is split into
    contiguous per-process slices (module docstring): each process gets its share of each kind
    (within one row), and so of the code scoring. The pipeline ends when the first kind runs out. Returns the grain IterDataset (`iter()` it for a checkpointable iterator) and the
    load counts of all kinds. Raises ValueError if a kind has fewer examples than its share of
    one global batch, or gets no row at all.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if set(weights) != set(sources):
        raise ValueError(f"weights {dict(weights)} and sources {list(sources)} must name the same kinds")
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    global_size = batch_size * process_count
    counts = mixture_counts(weights, global_size)
    streams, stats = [], DataStats()
    for kind, paths in sources.items():
        examples, kind_stats = prompt_examples(paths, kind, tokenizer, max_prompt_len=max_prompt_len,
                                               template=template, enable_thinking=enable_thinking,
                                               instruction=instruction)
        stats.add(kind_stats)
        if counts[kind] < 1:
            raise ValueError(f"the mixture {dict(weights)} gives {kind} no row of a global batch of {global_size}; "
                             f"raise its weight or the batch size")
        if len(examples) < counts[kind]:
            raise ValueError(f"{len(examples)} {kind} examples are fewer than its {counts[kind]} of a global batch of "
                             f"{global_size} (batch_size={batch_size} x {process_count} processes; "
                             f"{kind_stats.summary()}); add data, lower batch_size or raise max_prompt_len")
        stream = grain.MapDataset.source(list(examples))
        if shuffle:
            stream = stream.shuffle(seed=seed)
        streams.append(stream.repeat(num_epochs).batch(counts[kind], drop_remainder=True, batch_fn=list))
    start = process_index * batch_size
    step_slice = lambda step: spread_kinds([stream[step] for stream in streams])[start : start + batch_size]
    dataset = grain.MapDataset.range(min(len(stream) for stream in streams)).map(step_slice)
    # Examples are already in memory: read synchronously, no prefetch threads.
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)), stats


# ---------------------------------------------------------------------------- toy task

TOY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOY_THINK_TOKENS = ("<think>", "</think>")
# Whole phrases of the toy prompts, solutions and teacher template as single tokens: the toy
# task's rows stay short (the tiny model's steps cost what its tokens cost).
TOY_PHRASES = (MATH_INSTRUCTION, "Follow ", " arrows from ", "The answer is \\boxed{", "user\n", "assistant\n",
               "\nAnswer: ", "\nSolution:\n")
_TOY_WORDS = ("the", "answer", "The", "boxed", "Please", "reason", "step", "by",
              "and", "put", "your", "final", "within", "user", "assistant", "system")
# Qwen3's template reduced to plain turns: same markers, same empty think block when
# enable_thinking is false.
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


TOY_SYMBOLS = "123456"
TOY_MOVES = 8
TOY_EVAL_SHARE = 10  # one question in TOY_EVAL_SHARE belongs to the held-out split
# Every arrow line "a>b\n" is one token, in the question's table and in the walk alike: one
# lookup is one attention hop (find the table's arrow that leaves the symbol just reached, copy it).
TOY_ARROWS = tuple(f"{a}>{b}\n" for a in TOY_SYMBOLS for b in TOY_SYMBOLS if a != b)
TOY_QUESTION = re.compile(r"Follow (\d+) arrows from (\d):\n((?:\d>\d\n)+)")


def toy_walk(question: str, slip_rate: float = 0.0,
             rng: np.random.Generator | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The worked walk of a toy `question`: one arrow per line ("3>1", "1>4", ...), then the boxed
    end. With `slip_rate`, a solver that knows the way but slips writes it: each arrow lands on a
    uniformly drawn wrong symbol (never the one it leaves) with that probability (drawn with
    `rng`), and the walk goes on from the symbol written. Returns (the text, the character span
    [start, end) of each slipped line)."""
    moves, start, table = TOY_QUESTION.fullmatch(question).groups()
    arrows = dict(line.split(">") for line in table.split())
    here, lines, slips = start, [], []
    for k in range(int(moves)):
        there = arrows[here]
        if slip_rate and rng.random() < slip_rate:
            there = rng.choice([s for s in TOY_SYMBOLS if s not in (here, there)])
            slips.append((4 * k, 4 * k + 4))
        lines.append(f"{here}>{there}\n")
        here = there
    return "".join(lines) + f"The answer is \\boxed{{{here}}}.", slips


def toy_problem(rng: random.Random) -> dict:
    """One arrow walk `{question, answer, solution}`: a table of arrows, one from each of the
    symbols 1-6 to another (a random derangement), a start and `TOY_MOVES` arrows to follow, e.g.
    "Follow 8 arrows from 3:\n1>4\n2>6\n3>1\n4>5\n5>2\n6>3\n". The solution (`toy_walk`) follows
    one arrow per line: a path of lookups (no arithmetic) whose first wrong arrow is where a
    failed walk leaves a correct one."""
    targets = list(TOY_SYMBOLS)
    while any(a == b for a, b in zip(TOY_SYMBOLS, targets)):  # every arrow leaves its symbol
        rng.shuffle(targets)
    table = "".join(f"{a}>{b}\n" for a, b in zip(TOY_SYMBOLS, targets))
    question = f"Follow {TOY_MOVES} arrows from {rng.choice(TOY_SYMBOLS)}:\n{table}"
    solution, _ = toy_walk(question)
    return {"question": question, "answer": solution[-3], "solution": solution}  # "...\\boxed{a}."


def toy_split(question: str) -> str:
    """"eval" for the held-out share of questions (a fixed hash of the text), else "train": the
    splits never share a question, whatever seeds draw them."""
    return "eval" if zlib.crc32(question.encode()) % TOY_EVAL_SHARE == 0 else "train"


def toy_code_problem(rng: random.Random) -> dict:
    """One toy code problem `{question, tests, solution}` (code schema): a program that reads an
    integer n from stdin and prints a 1-2 operation expression of it (+, -, *, small operands; the
    expression reads as Python evaluates it). Three stdin/stdout tests; the solution is the
    program in a ```python block."""
    expr, ops = "n", []
    for _ in range(rng.randint(1, 2)):
        op, operand = rng.choice("+-*"), rng.randint(2, 9)
        if op == "*" and ("+" in expr or "-" in expr):  # applied left to right, as computed below
            expr = f"({expr})"
        expr = f"{expr} {op} {operand}"
        ops.append((op, operand))

    def value(n: int) -> int:
        for op, operand in ops:
            n = n + operand if op == "+" else n - operand if op == "-" else n * operand
        return n

    inputs = rng.sample(range(50), 3)
    return {"question": f"Read an integer n and print {expr}.",
            "tests": {"inputs": [f"{n}\n" for n in inputs], "outputs": [f"{value(n)}\n" for n in inputs]},
            "solution": f"```python\nn = int(input())\nprint({expr})\n```"}


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` through a private temporary file and a rename: processes that write
    the same file at once never read a partial one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_toy_dataset(path: str, n: int, seed: int, problem: Callable[[random.Random], dict] = toy_problem,
                      split: str = "train") -> str:
    """Writes `n` toy problems of `split` ("train" or "eval", see `toy_split`) to `path` (JSONL:
    math schema, or code schema with `problem=toy_code_problem`), deterministically from `seed`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        row = problem(rng)
        if toy_split(row["question"]) == split:
            rows.append(json.dumps(row) + "\n")
    write_atomically(path, "".join(rows))
    return path


def _toy_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Characters (printable ASCII + newline) plus a few whole words built by BPE merges."""
    vocab = {"<unk>": 0}
    for char in string.printable:
        if char not in "\t\r\x0b\x0c":
            vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _TOY_WORDS:
        for i in range(1, len(word)):
            if (word[:i], word[i]) not in merges:
                merges.append((word[:i], word[i]))
            vocab.setdefault(word[:i + 1], len(vocab))
    return vocab, merges


def build_toy_tokenizer(directory: str) -> str:
    """Saves the toy tokenizer in Hugging Face layout (tokenizer.json + tokenizer_config.json
    with the chat template) under `directory`, loadable by `AutoTokenizer.from_pretrained`.
    Qwen3's special tokens; eos `<|im_end|>`, pad `<|endoftext|>`; vocab < 256."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _toy_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in TOY_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in TOY_THINK_TOKENS + TOY_PHRASES + TOY_ARROWS])
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, "tokenizer.json"), tokenizer.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": "<unk>", "bos_token": None,
              "model_max_length": 32768, "clean_up_tokenization_spaces": False,
              "chat_template": TOY_CHAT_TEMPLATE}
    write_atomically(os.path.join(directory, "tokenizer_config.json"), json.dumps(config, indent=2))
    return directory
