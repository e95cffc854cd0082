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
                  hindsight__max_tests_tokens=64, hindsight__max_teacher_len=320, train__eval_every=0)
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


@pytest.mark.parametrize("weights,total,expected", [
    ({"math": 4, "code": 1}, 128, {"math": 102, "code": 26}),  # 102.4 / 25.6
    ({"math": 4, "code": 1}, 5, {"math": 4, "code": 1}),
    ({"math": 4, "code": 1}, 4, {"math": 3, "code": 1}),  # 3.2 / 0.8: the larger remainder
    ({"math": 1, "code": 1}, 3, {"math": 2, "code": 1}),  # a tie goes to the earlier kind
    ({"code": 1, "math": 1}, 3, {"code": 2, "math": 1}),
    ({"math": 100, "code": 1}, 4, {"math": 4, "code": 0}),
])
def test_mixture_counts_add_up_by_largest_remainder(weights, total, expected):
    from hsd_jax import data

    assert data.mixture_counts(weights, total) == expected


@pytest.fixture(scope="module")
def toy_sources(tmp_path_factory):
    """The toy tokenizer, and toy math (20 rows) and toy code (7 rows) files."""
    from transformers import AutoTokenizer

    from hsd_jax import data

    directory = tmp_path_factory.mktemp("mixture")
    tokenizer = AutoTokenizer.from_pretrained(data.build_toy_tokenizer(str(directory / "tok")), local_files_only=True)
    math_path = data.write_toy_dataset(str(directory / "math.jsonl"), 20, seed=1)
    code_path = data.write_toy_dataset(str(directory / "code.jsonl"), 7, seed=2, problem=data.toy_code_problem)
    return tokenizer, {"math": math_path, "code": code_path}


def mixture_batches(toy_sources, steps, weights=None, seed=5, batch_size=5, process_index=0, process_count=1,
                    state=None):
    from hsd_jax import data

    tokenizer, sources = toy_sources
    dataset, _ = data.mixture_dataset(sources, weights or {"math": 4, "code": 1}, tokenizer, batch_size=batch_size,
                                      max_prompt_len=512, seed=seed, process_index=process_index,
                                      process_count=process_count)
    iterator = iter(dataset)
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(steps)], iterator


def test_mixture_steps_hold_each_kinds_share_from_its_own_stream(toy_sources):
    from hsd_jax import data

    tokenizer, sources = toy_sources
    batches, _ = mixture_batches(toy_sources, 9)  # code: 7 rows, one per step: crosses an epoch
    # the code row in the middle: math rows at fractions 1/8, 3/8, 5/8, 7/8 of the batch, code at 1/2
    assert all([ex["kind"] for ex in batch] == ["math", "math", "code", "math", "math"] for batch in batches)
    # each kind's rows are the batches of its own single-kind pipeline with the same seed
    for kind, size in (("math", 4), ("code", 1)):
        alone, _ = data.prompt_dataset(sources[kind], kind, tokenizer, batch_size=size, max_prompt_len=512, seed=5,
                                       process_index=0, process_count=1)
        alone = iter(alone)
        assert [[ex for ex in batch if ex["kind"] == kind] for batch in batches] == [next(alone) for _ in batches]
    code_questions = [batch[2]["question"] for batch in batches]
    assert len(set(code_questions[:7])) == 7 and set(code_questions[7:]) <= set(code_questions[:7])
    assert batches[0][2]["prompt"].count("```python code block") == 1  # each row's kind instruction
    assert "\\boxed{}" in batches[0][0]["prompt"]


def test_mixture_is_deterministic_resumable_and_split_over_processes(toy_sources):
    import json

    first, _ = mixture_batches(toy_sources, 6)
    again, _ = mixture_batches(toy_sources, 6)
    other, _ = mixture_batches(toy_sources, 6, seed=6)
    assert first == again and first != other
    _, iterator = mixture_batches(toy_sources, 2)
    state = json.loads(json.dumps(iterator.get_state()))
    resumed, _ = mixture_batches(toy_sources, 4, state=state)
    assert resumed == first[2:]
    single, _ = mixture_batches(toy_sources, 3, batch_size=6)  # 6 at 4:1 -> 5 math (4.8) + 1 code (1.2)
    halves = [mixture_batches(toy_sources, 3, batch_size=3, process_index=p, process_count=2)[0] for p in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == single
    assert [ex["kind"] for ex in single[0]] == ["math"] * 3 + ["code"] + ["math"] * 2  # code at 1/2 ties math's 5/10


def test_mixture_gives_every_process_its_share_of_each_kind(toy_sources):
    """10 rows at 4:1 over two processes: 8 math + 2 code, one code row on each process (the code
    scoring is split too), and the halves are the single process's batch."""
    single, _ = mixture_batches(toy_sources, 3, batch_size=10)
    halves = [mixture_batches(toy_sources, 3, batch_size=5, process_index=p, process_count=2)[0] for p in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == single
    for half in halves:
        assert all(sorted(ex["kind"] for ex in batch) == ["code"] + ["math"] * 4 for batch in half)


def test_mixture_errors_name_the_kind(toy_sources):
    with pytest.raises(ValueError, match="gives code no row"):
        mixture_batches(toy_sources, 1, weights={"math": 100, "code": 1}, batch_size=4)
    with pytest.raises(ValueError, match="7 code examples are fewer than its 8"):
        mixture_batches(toy_sources, 1, weights={"math": 1, "code": 1}, batch_size=16)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """configs/tiny.py on toy math and toy code at 4:1 (5 questions: 4 math + 1 code per step)."""
    import importlib

    from hsd_jax import trainer

    config = importlib.import_module("configs.tiny").get_config()
    config.workdir = str(tmp_path_factory.mktemp("mixed_run"))
    config.data.mixture = "math:4,code:1"
    config.data.toy_examples = 8
    config.data.questions_per_step = 5
    config.data.max_prompt_len = 224  # the code instruction is spelled character by character
    config.data.code_allow_same_uid = LIMITS.allow_same_uid
    config.sampling.group_size = 2
    config.sampling.max_new_tokens = 16
    config.hindsight.max_tests_tokens = 64
    config.hindsight.max_teacher_len = 384
    config.train.micro_batch = 5
    config.train.sft_warmup_steps = 0
    config.train.eval_every = 0  # the step alone; evaluation has its own test below
    config.train.steps = 1
    return trainer.Run(config)


def test_a_toy_mixture_trains_end_to_end_with_each_row_scored_by_its_kind(mixed_run, monkeypatch):
    from hsd_jax import reporting

    run, scored, references = mixed_run, [], []
    score, reference_tokens = rollout.score, rollout.reference_tokens

    def spy_score(scorer, tokenizer, examples, rollouts):
        rewards, reasons = score(scorer, tokenizer, examples, rollouts)
        scored.append((scorer.kinds, [ex["kind"] for ex in examples], reasons))
        return rewards, reasons

    def spy_references(tokenizer, examples, **options):
        out = reference_tokens(tokenizer, examples, **options)
        references.extend(zip([ex["kind"] for ex in examples], tokenizer.batch_decode(out[0])))
        return out

    monkeypatch.setattr(rollout, "score", spy_score)
    monkeypatch.setattr(rollout, "reference_tokens", spy_references)
    run.train()
    assert [row["step"] for row in reporting.read_metrics(f"{run.workdir}/metrics.jsonl")] == [1]
    assert (mixed_run.checkpointer.manager.directory / "1").is_dir()
    assert [(kinds, rows) for kinds, rows, _ in scored] == [(("toy", "code"), ["math", "math", "code", "math", "math"])]
    assert len(scored[0][2]) == 10  # G = 2 rollouts per question
    code_references = [text for kind, text in references if kind == "code"]
    assert len(code_references) == 1  # the step's code row
    assert all(text.startswith("Input:\n") and len(run.tokenizer.encode(text)) <= 64 for text in code_references)


def test_evaluation_reports_each_kind(mixed_run, tmp_path, monkeypatch):
    """A math and a code eval set (`code=` prefix): each scored as its kind, per set and overall."""
    import random

    from hsd_jax import data, evaluate, reporting

    run = mixed_run
    monkeypatch.setattr(run, "reporter", reporting.Reporter(str(tmp_path), run.config.train.steps, enabled=False))
    math_rows = [data.toy_problem(random.Random(i)) for i in range(2)]
    code_rows = [data.toy_code_problem(random.Random(i)) for i in range(1)]
    spec = f"{write_rows(tmp_path / 'm.jsonl', math_rows)},code={write_rows(tmp_path / 'c.jsonl', code_rows)}"
    monkeypatch.setattr(run, "eval_sets", evaluate.parse_eval_files(spec, 2))
    verdicts = {math_rows[0]["question"]: [1, 1], math_rows[1]["question"]: [0, 1], code_rows[0]["question"]: [0, 0]}
    kinds = {}

    def scripted_scorer(examples, completions, truncated):
        kinds.update({ex["question"]: ex["kind"] for ex in examples})
        return np.array([v for ex in examples for v in verdicts[ex["question"]]], np.float32), ["x"] * len(completions)

    metrics = run.evaluate(scripted_scorer)
    assert kinds == {math_rows[0]["question"]: "math", math_rows[1]["question"]: "math", code_rows[0]["question"]: "code"}
    expected = {"eval/m/avg@2": 3 / 4, "eval/m/pass@1": 3 / 4, "eval/c/avg@2": 0.0, "eval/c/pass@1": 0.0,
                "eval/accuracy": (1 + 0.5 + 0) / 3}
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_kind_files_and_mixture_parse_as_written(tmp_path):
    assert validation.kind_files(" a.jsonl, code=c.jsonl ,,math=m.jsonl, x=y.jsonl", "math") == {
        "math": ["a.jsonl", "m.jsonl", "x=y.jsonl"], "code": ["c.jsonl"]}
    config = config_of("tiny", None, tmp_path, data__mixture="code:1, math:4")
    assert validation.mixture(config) == {"code": 1.0, "math": 4.0}
    assert validation.verifiers(config) == ("code", "toy")  # the toy task's math rows: exact match
    assert validation.mixture(config_of("tiny", None, tmp_path)) == {"math": 1.0}


MATH_FILE, CODE_FILE = str(ROOT / "examples" / "math.jsonl"), str(ROOT / "examples" / "code.jsonl")


@pytest.mark.parametrize("overrides,fragments", [
    (dict(data__mixture="math:4,cod:1"), ["config.data.mixture='math:4,cod:1'", "'cod' is not a kind"]),
    (dict(data__mixture="math:x"), ["config.data.mixture='math:x'", "positive weight", "'math:4,code:1'"]),
    (dict(data__mixture="math:0,code:1"), ["config.data.mixture='math:0,code:1'", "positive weight"]),
    (dict(data__mixture="math"), ["config.data.mixture='math'", "kind:weight"]),
    (dict(data__mixture="math:1,math:2"), ["config.data.mixture='math:1,math:2' names 'math' twice"]),
    (dict(data__mixture="math:100,code:1"), ["config.data.mixture='math:100,code:1' gives code 0 of the 4",
                                             "config.data.questions_per_step"]),
    (dict(data__kind="math", data__mixture="math:4,code:1", data__train_files=MATH_FILE),
     ["config.data.train_files has no code file for config.data.mixture='math:4,code:1'", "'code='"]),
    (dict(data__kind="math", data__train_files=f"{MATH_FILE},code={CODE_FILE}"),
     ["config.data.train_files has code files but config.data.kind='math' (no data.mixture) has no code rows"]),
    (dict(data__kind="math", data__train_files=MATH_FILE, data__eval_files=f"code={CODE_FILE}"),
     ["config.data.eval_files has code files"]),
    (dict(data__kind="math", data__mixture="math:4,code:1", data__train_files=f"{MATH_FILE},code=/nonexistent/c.jsonl"),
     ["config.data.train_files: '/nonexistent/c.jsonl' does not exist"]),
])
def test_bad_mixtures_name_the_field(overrides, fragments, tmp_path):
    rejected(config_of("tiny", None, tmp_path, tokenizer_path=str(tmp_path), **overrides), *fragments)


def test_a_math_and_code_mixture_of_files_validates_and_budgets_the_tests(tmp_path):
    fields = dict(tokenizer_path=str(tmp_path), data__kind="math", data__mixture="math:4,code:1",
                  data__train_files=f"{MATH_FILE},code={CODE_FILE}", data__eval_files=f"code={CODE_FILE}",
                  hindsight__max_tests_tokens=64, data__max_prompt_len=96, sampling__max_new_tokens=64)
    config = config_of("tiny", None, tmp_path, hindsight__max_teacher_len=96 + 64 + 64 + 64, **fields)
    validation.validate(validation.resolve(config))
    rejected(config_of("tiny", None, tmp_path, hindsight__max_teacher_len=96 + 64 + 64 + 63, **fields),
             "config.hindsight.max_teacher_len", "hindsight.max_tests_tokens")


@pytest.mark.parametrize("mixture,files", [("", CODE_FILE), ("math:4,code:1", f"math={MATH_FILE},{CODE_FILE}")])
def test_the_code_recipe_validates_at_full_size(mixture, files, tmp_path):
    from hsd_jax import hindsight

    config = validation.resolve(config_of("qwen3_8b_code", None, tmp_path, tokenizer_path=str(tmp_path),
                                          data__train_files=files, data__mixture=mixture))
    loss_cfg = validation.validate(config)
    assert (config.sampling.max_new_tokens, loss_cfg.max_response_length) == (8192, 8192)
    assert config.hindsight.context == "peer_answer" and config.data.kind == "code"
    assert validation.mixture(config) == ({"code": 1.0} if not mixture else {"math": 4.0, "code": 1.0})
    h = config.hindsight
    assert h.max_teacher_len >= 1024 + h.max_tests_tokens + 2 * 8192  # question, tests, peer, rollout
    assert hindsight.bucket_length(h.max_teacher_len, h.buckets) == 20480
    assert hindsight.bucket_length(config.data.max_prompt_len + 8192, h.buckets) == 12288
