"""Data pipeline: validation counts, chat templating, sharding, deterministic resume, toy task."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from hsd_jax import data
from hsd_jax.rewards.math import exact_match

REPO = Path(__file__).resolve().parent.parent
# Qwen3's chat template as published in its tokenizer_config.json (Qwen/Qwen3-8B).
QWEN3_CHAT_TEMPLATE = (Path(__file__).resolve().parent / "data" / "qwen3_chat_template.jinja").read_text()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return data.build_toy_tokenizer(str(tmp_path_factory.mktemp("toy_tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    """The toy tokenizer (Qwen3-style specials and chat template), loaded like a real one."""
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="module")
def qwen3_tokenizer(tokenizer_dir):
    """The toy vocabulary with Qwen3's real chat template."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory):
    return data.write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.jsonl"), 23, seed=1)


def questions(batches):
    return [[example["question"] for example in batch] for batch in batches]


def test_toy_tokenizer_is_small_and_qwen3_shaped(tokenizer):
    assert len(tokenizer) < 512
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    text = "<think>\n12 * 3 = 36\n</think>\n\nThe answer is \\boxed{36}.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


# The prompt of "What is (3 + 4) * 2?" in Qwen3's chat format, written out by hand.
QWEN3_PROMPT = ("<|im_start|>user\nWhat is (3 + 4) * 2?\n\nPlease reason step by step, and put "
                "your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
QWEN3_PROMPT_NO_THINKING = QWEN3_PROMPT + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("template", ["toy", "qwen3"])
@pytest.mark.parametrize("enable_thinking, expected", [(True, QWEN3_PROMPT),
                                                       (False, QWEN3_PROMPT_NO_THINKING)])
def test_chat_prompt_is_qwen3_format(tokenizer, qwen3_tokenizer, template, enable_thinking,
                                     expected):
    tok = qwen3_tokenizer if template == "qwen3" else tokenizer
    [example] = data.encode_prompts([{"question": "What is (3 + 4) * 2?", "answer": "14"}], tok,
                                    "math", max_prompt_len=1000, enable_thinking=enable_thinking)
    assert example["prompt"] == expected
    ids = example["prompt_ids"]
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1


def test_shipped_qwen3_template_drops_past_reasoning(qwen3_tokenizer):
    """The test data is Qwen3's template: an earlier assistant turn loses its think block, the
    system turn comes first."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\nadd\n</think>\n\n2"},
                {"role": "user", "content": "2+2?"}]
    text = qwen3_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_plain_template(tokenizer):
    prompt = data.render_prompt("2 + 2?", tokenizer, template="Q: {question}\nA:", instruction="")
    assert prompt == "Q: 2 + 2?\nA:"
    with pytest.raises(ValueError, match="placeholder"):
        data.render_prompt("2 + 2?", tokenizer, template="no slot")


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    good = {"question": "1 + 1?", "answer": "2"}
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({"answer": "2"}),
             json.dumps({"question": "q", "answer": ""}), json.dumps({"question": "q", "answer": 3}),
             json.dumps({"question": "q", "answer": True}), "",
             json.dumps({"question": "q", "answer": "1", "solution": 5})]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, stats = data.load_rows(str(path), "math")
    assert rows == [good, {"question": "q", "answer": "3"}]
    assert (stats.read, stats.kept) == (8, 2)
    assert stats.skipped == {"invalid_json": 1, "not_an_object": 1, "bad_question": 1,
                             "bad_answer": 2, "bad_solution": 1}


def test_malformed_code_rows_and_parquet(tmp_path):
    tests = {"inputs": ["1\n"], "outputs": ["2\n"]}
    table = pa.table({"question": ["double it", "bad tests", "no outputs", None],
                      "tests": [json.dumps(tests), "{oops", json.dumps({"inputs": ["1"]}),
                                json.dumps(tests)]})
    path = tmp_path / "code.parquet"
    pq.write_table(table, path)
    rows, stats = data.load_rows([str(path)], "code")
    assert rows == [{"question": "double it", "tests": json.dumps(tests)}]
    assert stats.skipped == {"bad_tests": 2, "bad_question": 1}


def test_bad_utf8_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"question": "1 + 1?", "answer": "2"}\n'  # byte-order mark
                     b'{"question": "caf\xe9 au lait?", "answer": "1"}\n'  # latin-1, not UTF-8
                     b"\n"
                     b'{"question": "caf\xc3\xa9?", "answer": "3"}\n')
    rows, stats = data.load_rows(str(path), "math")
    assert rows == [{"question": "1 + 1?", "answer": "2"}, {"question": "caf\u00e9?", "answer": "3"}]
    assert (stats.read, stats.kept, stats.skipped) == (3, 2, {"bad_utf8": 1})
    assert stats.samples == [f"{path} line 2: bad_utf8"]


def test_unknown_file_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"\.jsonl.*\.parquet"):
        data.load_rows(str(tmp_path / "rows.csv"), "math")


def test_missing_file_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        data.load_rows(missing, "math")


def test_check_files_fails_fast_naming_field_and_file(tmp_path):
    field = "config.data.train_files"
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"question": "1 + 1?", "answer": 2}) + "\n{oops\n")
    bad.write_text("\n".join(json.dumps({"question": "", "answer": "1"}) for _ in range(3)) + "\n")

    stats = data.check_files([str(good), str(good)], "math", field)
    assert (stats.read, stats.kept, stats.skipped) == (4, 2, {"invalid_json": 2})
    with pytest.raises(ValueError) as error:
        data.check_files([str(good), str(bad)], "math", field)
    assert str(error.value).startswith(f"{field}: {bad} has no valid math row (read 3 rows, kept 0, "
                                       "skipped: bad_question=3); each row must be {")
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match=f"^{field}: .*{re.escape(missing)}"):
        data.check_files([str(good), missing], "math", field)
    with pytest.raises(ValueError, match=f"^{field}: .*rows.csv.*unknown format"):
        data.check_files(str(tmp_path / "rows.csv"), "math", field)
    with pytest.raises(ValueError, match=f"^{field} is empty"):
        data.check_files([], "math", field)


def test_long_prompts_are_filtered_and_counted(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": "1"})
                              for q in ["short", "x" * 500, "also short", ""]) + "\n")
    dataset, stats = data.prompt_dataset(str(path), "math", tokenizer, batch_size=1,
                                         max_prompt_len=200, num_epochs=1, shuffle=False,
                                         process_index=0, process_count=1)
    assert questions(dataset) == [["short"], ["also short"]]
    assert stats.skipped == {"too_long": 1, "bad_question": 1} and stats.kept == 2

    # What a warm-up or an evaluation reads: the same valid, short-enough examples.
    examples, stats = data.prompt_examples(str(path), "math", tokenizer, max_prompt_len=200)
    assert [(e["question"], e["answer"]) for e in examples] == [("short", "1"), ("also short", "1")]
    assert all(len(e["prompt_ids"]) <= 200 for e in examples)
    assert stats.skipped == {"too_long": 1, "bad_question": 1} and stats.kept == 2


def test_math_rows_from_parquet_through_prompt_dataset(tmp_path, tokenizer):
    table = pa.table({"question": ["What is 7 * 2?", "", "What is 1 + 2?"],
                      "answer": [14, 5, 3],
                      "solution": ["7 * 2 = 14\nThe answer is \\boxed{14}.", None, None]})
    path = tmp_path / "math.parquet"
    pq.write_table(table, path)
    dataset, stats = data.prompt_dataset(str(path), "math", tokenizer, batch_size=2,
                                         max_prompt_len=512, num_epochs=1, shuffle=False,
                                         process_index=0, process_count=1)
    [batch] = list(dataset)
    assert [{k: e[k] for k in ("question", "answer", "solution") if k in e} for e in batch] == [
        {"question": "What is 7 * 2?", "answer": "14",
         "solution": "7 * 2 = 14\nThe answer is \\boxed{14}."},
        {"question": "What is 1 + 2?", "answer": "3"}]
    assert batch[1]["prompt"] == ("<|im_start|>user\nWhat is 1 + 2?\n\nPlease reason step by step, "
                                  "and put your final answer within \\boxed{}.<|im_end|>\n"
                                  "<|im_start|>assistant\n")
    assert (stats.read, stats.kept, stats.skipped) == (3, 2, {"bad_question": 1})


def test_resume_yields_the_batches_of_an_uninterrupted_run(toy_path, tokenizer):
    def make():
        dataset, _ = data.prompt_dataset(toy_path, "math", tokenizer, batch_size=4,
                                         max_prompt_len=512, seed=7, process_index=0,
                                         process_count=1)
        return iter(dataset)

    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(12)]  # 48 examples: crosses two epochs
    first = make()
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # survives serialisation
    resumed = make()
    resumed.set_state(state)
    resumed_batches = [next(resumed) for _ in range(7)]
    assert questions(resumed_batches) == questions(expected[5:])
    assert resumed_batches == expected[5:]


def test_shuffle_is_deterministic_by_seed(toy_path, tokenizer):
    def order(seed):
        dataset, _ = data.prompt_dataset(toy_path, "math", tokenizer, batch_size=23,
                                         max_prompt_len=512, seed=seed, num_epochs=1,
                                         process_index=0, process_count=1)
        return questions(dataset)

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)[0]) == sorted(order(1)[0])


def test_processes_take_contiguous_slices_of_the_single_process_batches(toy_path, tokenizer):
    def batches(process_index, process_count, batch_size):
        dataset, _ = data.prompt_dataset(toy_path, "math", tokenizer, batch_size=batch_size,
                                         max_prompt_len=512, seed=3, num_epochs=1,
                                         process_index=process_index, process_count=process_count)
        return [[ex["question"] for ex in batch] for batch in dataset]

    single = batches(0, 1, 4)
    first, second = batches(0, 2, 2), batches(1, 2, 2)
    assert len(single) == len(first) == len(second) == 23 // 4
    assert [a + b for a, b in zip(first, second)] == single
    rows, _ = data.load_rows(toy_path, "math")
    assert len({q for batch in single for q in batch}) == 20  # no example twice in an epoch
    assert {q for batch in single for q in batch} <= {row["question"] for row in rows}


def test_shard_smaller_than_batch_is_a_clear_error(toy_path, tokenizer):
    with pytest.raises(ValueError, match="batch_size=50"):
        data.prompt_dataset(toy_path, "math", tokenizer, batch_size=50, max_prompt_len=512,
                            process_index=0, process_count=1)


def arrow_walk(text):
    """(lines as (from, to) pairs, boxed answer) of a worked toy walk, checking its layout."""
    *lines, last = text.splitlines()
    pairs = [tuple(line.split(">")) for line in lines]
    assert all(re.fullmatch(r"\d>\d", line) for line in lines)
    return pairs, last


def test_toy_problems_are_correct_and_verifiable(toy_path):
    rows, _ = data.load_rows(toy_path, "math")
    again, _ = data.load_rows(data.write_toy_dataset(toy_path + ".again.jsonl", 23, seed=1), "math")
    assert rows == again
    for row in rows:
        moves, start, table = re.fullmatch(r"Follow (\d) arrows from (\d):\n((?:\d>\d\n)+)", row["question"]).groups()
        arrows = dict(line.split(">") for line in table.splitlines())
        assert int(moves) == 8 and sorted(arrows) == sorted(arrows.values()) == list("123456")
        assert all(a != b for a, b in arrows.items())  # every arrow leaves its symbol
        assert exact_match(row["solution"], row["answer"]) == (1.0, "correct")
        pairs, last = arrow_walk(row["solution"])
        assert last == f"The answer is \\boxed{{{row['answer']}}}."
        position = start
        for a, b in pairs:  # one arrow per line, followed from where the walk stands
            assert a == position and b == arrows[a]
            position = b
        assert len(pairs) == 8 and position == row["answer"]


QUESTION = "Follow 8 arrows from 2:\n1>3\n2>4\n3>6\n4>5\n5>2\n6>1\n"
ARROWS = {"1": "3", "2": "4", "3": "6", "4": "5", "5": "2", "6": "1"}


def test_toy_solution_of_a_hand_worked_walk():
    problem = data.toy_problem(random.Random(1))
    assert problem["question"] == QUESTION
    # Followed by hand: 2 -> 4 -> 5 -> 2 -> 4 -> 5 -> 2 -> 4 -> 5.
    assert problem["solution"] == "2>4\n4>5\n5>2\n2>4\n4>5\n5>2\n2>4\n4>5\nThe answer is \\boxed{5}."
    assert problem["answer"] == "5"


def test_toy_tokenizer_reads_each_arrow_line_as_one_token(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(data.build_toy_tokenizer(str(tmp_path)))
    text = data.toy_problem(random.Random(1))["solution"]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(text)]
    assert pieces == ["2>4\n", "4>5\n", "5>2\n", "2>4\n", "4>5\n", "5>2\n", "2>4\n", "4>5\n",
                      "The answer is \\boxed{", "5", "}", "."]
    assert tokenizer.decode(tokenizer.encode(QUESTION)) == QUESTION


def test_toy_walk_walks_on_from_each_wrong_symbol():
    solution = data.toy_problem(random.Random(1))["solution"]
    assert data.toy_walk(QUESTION) == (solution, [])
    for seed in range(20):  # rate 1: every arrow lands wrong, and the walk goes on from where it landed
        text, slips = data.toy_walk(QUESTION, 1.0, np.random.default_rng(seed))
        pairs, last = arrow_walk(text)
        position = "2"
        for a, b in pairs:
            assert a == position and b not in (a, ARROWS[a]) and b in "123456"
            position = b
        assert last == f"The answer is \\boxed{{{position}}}."
        assert slips == [(4 * k, 4 * k + 4) for k in range(8)]
    walks = [data.toy_walk(QUESTION, 0.3, np.random.default_rng(seed)) for seed in range(400)]
    for text, slips in walks:  # the slipped lines are exactly those whose arrow is not the table's
        lines = text.splitlines(keepends=True)[:8]
        assert [text[a:b] for a, b in slips] == [line for line in lines if ARROWS[line[0]] != line[2]]
    for k in range(8):  # each line slips with probability 0.3, whatever happened before it
        assert sum((4 * k, 4 * k + 4) in slips for _, slips in walks) / 400 == pytest.approx(0.3, abs=0.07)
    assert sum(not slips for _, slips in walks) / 400 == pytest.approx(0.7 ** 8, abs=0.03)



def test_toy_eval_split_shares_no_question_with_train(tmp_path):
    train, _ = data.load_rows(data.write_toy_dataset(str(tmp_path / "train.jsonl"), 3000, seed=0), "math")
    held_out, _ = data.load_rows(data.write_toy_dataset(str(tmp_path / "eval.jsonl"), 300, seed=0, split="eval"),
                                 "math")
    assert len(train) == 3000 and len(held_out) == 300
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    with pytest.raises(ValueError, match="split must be"):
        data.write_toy_dataset(str(tmp_path / "x.jsonl"), 1, seed=0, split="test")


def test_example_files_are_clean(tokenizer):
    for kind in data.KINDS:
        rows, stats = data.load_rows(str(REPO / "examples" / f"{kind}.jsonl"), kind)
        assert len(rows) == 12 and not stats.skipped, stats.summary()
