"""Data pipeline: validation counts, chat templating, sharding, deterministic resume, toy task."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from hsd_jax import data
from hsd_jax.rewards.math import exact_match


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The toy tokenizer (Qwen3-style specials and chat template), loaded like a real one."""
    path = data.build_toy_tokenizer(str(tmp_path_factory.mktemp("toy_tokenizer")))
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_prompt_matches_apply_chat_template(tokenizer, enable_thinking):
    question = "What is (3 + 4) * 2?"
    [example] = data.encode_prompts([{"question": question, "answer": "14"}], tokenizer, "math",
                                    max_prompt_len=1000, enable_thinking=enable_thinking)
    messages = [{"role": "user", "content": f"{question}\n\n{data.MATH_INSTRUCTION}"}]
    reference = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              enable_thinking=enable_thinking)["input_ids"]
    assert example["prompt_ids"] == list(reference)
    assert example["prompt"].startswith("<|im_start|>user\nWhat is")
    assert example["prompt"].endswith("<think>\n\n</think>\n\n" if not enable_thinking
                                      else "<|im_start|>assistant\n")


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


def test_unknown_file_format_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"\.jsonl.*\.parquet"):
        data.load_rows(str(tmp_path / "rows.csv"), "math")


def test_long_prompts_are_filtered_and_counted(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": "1"})
                              for q in ["short", "x" * 500, "also short"]) + "\n")
    dataset, stats = data.prompt_dataset(str(path), "math", tokenizer, batch_size=1,
                                         max_prompt_len=200, num_epochs=1, shuffle=False,
                                         process_index=0, process_count=1)
    assert questions(dataset) == [["short"], ["also short"]]
    assert stats.skipped == {"too_long": 1} and stats.kept == 2


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


def test_two_processes_get_disjoint_shards_that_cover_the_data(toy_path, tokenizer):
    shards = []
    for process_index in range(2):
        dataset, _ = data.prompt_dataset(toy_path, "math", tokenizer, batch_size=1,
                                         max_prompt_len=512, seed=3, num_epochs=1,
                                         process_index=process_index, process_count=2)
        shards.append([q for [q] in questions(dataset)])
    rows, _ = data.load_rows(toy_path, "math")
    all_questions = [row["question"] for row in rows]
    assert len(all_questions) == len(set(all_questions))  # the toy data has no duplicates
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_questions)
    assert (len(shards[0]), len(shards[1])) == (12, 11)


def test_shard_smaller_than_batch_is_a_clear_error(toy_path, tokenizer):
    with pytest.raises(ValueError, match="batch_size=50"):
        data.prompt_dataset(toy_path, "math", tokenizer, batch_size=50, max_prompt_len=512,
                            process_index=0, process_count=1)


def test_toy_problems_are_correct_and_verifiable(toy_path):
    rows, _ = data.load_rows(toy_path, "math")
    again, _ = data.load_rows(data.write_toy_dataset(toy_path + ".again.jsonl", 23, seed=1), "math")
    assert rows == again
    for row in rows:
        expression = re.fullmatch(r"What is (.*)\?", row["question"]).group(1)
        assert str(eval(expression)) == row["answer"]  # independent arithmetic
        assert exact_match(row["solution"], row["answer"]) == (1.0, "correct")
        for step in row["solution"].splitlines()[:-1]:
            lhs, rhs = step.split(" = ")
            assert eval(lhs) == int(rhs)


def test_example_files_are_clean(tokenizer):
    for kind in data.KINDS:
        rows, stats = data.load_rows(f"examples/{kind}.jsonl", kind)
        assert len(rows) == 12 and not stats.skipped, stats.summary()
