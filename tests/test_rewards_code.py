"""Code sandbox: correct programs pass; adversarial programs score 0 within their limits, the test
process survives and nothing outside the sandbox changes. Limits are small so a containment bug
cannot hurt the (shared) machine: 2 s per test, 256 MiB, 8 processes, 1 MiB of output."""
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from hsd_jax.rewards import Scorer, code
from hsd_jax.rewards.code import (
    CodeVerifier,
    SandboxLimits,
    extract_code,
    normalize_tests,
    run_tests,
    sandbox_isolation,
    sandbox_uid,
)
from hsd_jax.rewards.code import TestSpec as Spec

LIMITS = SandboxLimits(timeout_s=2.0, memory_bytes=256 << 20, max_processes=8,
                       max_output_bytes=1 << 20)
ISOLATION = sandbox_isolation()
needs_namespaces = pytest.mark.skipif(ISOLATION == "none",
                                      reason="network/filesystem isolation needs namespaces")
DOUBLE = {"inputs": ["21\n", "5\n"], "outputs": ["42\n", "10\n"]}
ADD = {"fn_name": "add", "inputs": [[1, 2], [-3, 3]], "outputs": [3, 0]}


def fenced(program: str) -> str:
    return f"Here is my solution.\n```python\n{program}\n```\n"


def sandbox_processes() -> list[int]:
    """Pids of live processes owned by the test's sandbox uids."""
    uids = {str(sandbox_uid(LIMITS, slot)) for slot in range(2)}
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if status["Uid"].split()[0] in uids and "Z" not in status["State"]:
            pids.append(int(pid))
    return pids


def assert_no_leftovers():
    deadline = time.monotonic() + 3.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(num_workers=2, limits=LIMITS)


def test_extract_code_takes_the_last_python_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```text\nnope\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("<think>```python\nprint(1)\n```</think> no code") is None
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"


def test_normalize_tests_formats():
    apps = normalize_tests(json.dumps(DOUBLE))
    assert apps.fn_name is None and apps.cases[0].input == "21\n"
    lcb = normalize_tests([{"input": "[1, 2]\n3", "output": "[0, 1]", "testtype": "functional"}],
                          fn_name="twoSum")
    assert lcb.fn_name == "twoSum" and lcb.cases[0].input == [[1, 2], 3]
    assert lcb.cases[0].output == [0, 1]
    with pytest.raises(ValueError, match="inputs"):
        normalize_tests({"inputs": ["1"]})
    with pytest.raises(ValueError, match="fn_name"):
        normalize_tests([{"input": "[1]", "output": "1", "testtype": "functional"}])


def test_correct_solutions_score_one(verifier):
    completions = [
        fenced("print(int(input()) * 2)"),
        fenced("def add(a, b):\n    print('debug output is ignored')\n    return a + b"),
        fenced("class Solution:\n    def add(self, a, b):\n        return a + b"),
        fenced("print(int(input()) * 2 + 1)"),
        fenced("def add(a, b):\n    return a - b"),
        "no code at all",
    ]
    tests = [DOUBLE, ADD, ADD, DOUBLE, ADD, DOUBLE]
    assert verifier(completions, tests) == [
        (1.0, "correct"), (1.0, "correct"), (1.0, "correct"),
        (0.0, "wrong"), (0.0, "wrong"), (0.0, "no_answer")]


def test_output_comparison_tolerates_whitespace_and_float_noise():
    spec = normalize_tests({"inputs": [""], "outputs": ["0.3333333 1\n2\n"]})
    assert run_tests("print(1/3, 1, '  ')\nprint(2)\nprint()", spec, LIMITS) == (1.0, "correct")


def test_score_code_over_example_rows(verifier):
    with open("examples/code.jsonl") as f:
        rows = [json.loads(line) for line in f][:2]
    completions = [fenced("a, b = map(int, input().split())\nprint(a + b)"),
                   fenced("import math\nprint(math.factorial(int(input())))")]
    with Scorer("code", num_workers=2, code_limits=LIMITS) as scorer:
        rewards, reasons = scorer(rows, completions, truncated=[False, True])
    np.testing.assert_array_equal(rewards, [1.0, 0.0])
    assert reasons == ["correct", "truncated"]


ADVERSARIAL = {
    "infinite_loop": ("while True:\n    pass", {"timeout"}),
    "sleep": ("import time\ntime.sleep(60)\nprint(42)", {"timeout"}),
    "fork_bomb": (("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                  "        pass"), {"timeout", "runtime_error"}),
    "escaping_children": (
        ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        os.setsid()\n"
        "        time.sleep(60)\n        os._exit(0)"), {"wrong"}),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))",
                    {"runtime_error", "timeout"}),
    "gigabyte_of_output": (("import sys\nline = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                           "    sys.stdout.write(line)"), {"output_limit"}),
    "sys_exit_before_output": ("import sys\nsys.exit(0)\nprint(int(input()) * 2)", {"wrong"}),
    "os_exit_before_output": ("import os\nos._exit(0)\nprint(int(input()) * 2)", {"wrong"}),
    "fills_the_disk": (("with open('big', 'wb') as f:\n    while True:\n"
                       "        f.write(b'x' * (1 << 20))"), {"runtime_error"}),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_program_scores_zero(verifier, name):
    program, reasons = ADVERSARIAL[name]
    start = time.monotonic()
    [(reward, reason)] = verifier([fenced(program)], [DOUBLE])
    assert reward == 0.0 and reason in reasons
    assert time.monotonic() - start < LIMITS.timeout_s + 5  # first test fails: one deadline
    assert_no_leftovers()


def test_killing_its_parent_and_the_trainer_scores_zero(verifier):
    program = (f"import os, signal\n"
               f"for pid in (os.getppid(), {os.getpid()}, 0, -1):\n"
               f"    try:\n        os.kill(pid, signal.SIGKILL)\n"
               f"    except OSError:\n        pass")
    assert verifier([fenced(program)], [DOUBLE]) == [(0.0, "wrong")]
    assert_no_leftovers()  # and this test process is evidently still alive


def test_tampering_with_the_harness_scores_zero(verifier):
    program = (
        "import builtins, json, os, sys\n"
        "class AlwaysEqual:\n    def __eq__(self, other):\n        return True\n"
        "json.dumps = lambda *args, **kwargs: '\"PASSED\"'\n"
        "builtins.print = lambda *args, **kwargs: None\n"
        "for fd in range(3, 20):\n    try:\n        os.write(fd, b'true')\n"
        "    except OSError:\n        pass\n"
        "def add(a, b):\n    return AlwaysEqual()")
    assert verifier([fenced(program)], [ADD]) == [(0.0, "wrong")]
    stdio = "import sys\nsys.stdout.write('PASSED\\nall tests passed\\n')\nsys.exit(0)"
    assert verifier([fenced(stdio)], [DOUBLE]) == [(0.0, "wrong")]


@needs_namespaces
def test_writing_outside_its_directory_changes_nothing(verifier, tmp_path):
    targets = [str(tmp_path / "escape.txt"), f"/tmp/hsd-escape-{os.getpid()}.txt",
               f"/var/tmp/hsd-escape-{os.getpid()}.txt", os.path.abspath("escape.txt")]
    program = (f"import os\nwritten = 0\n"
               f"for path in {targets!r} + ['../escape.txt']:\n"
               f"    try:\n        with open(path, 'w') as f:\n            f.write('x')\n"
               f"        written += 1\n    except OSError:\n        pass\n"
               f"print(written)")
    try:
        [(reward, _)] = verifier([fenced(program)], [DOUBLE])
        assert [p for p in targets if os.path.exists(p)] == []
    finally:
        for path in targets:
            if os.path.exists(path):
                os.remove(path)
    assert list(tmp_path.iterdir()) == []
    assert reward == 0.0


@needs_namespaces
def test_network_connections_are_blocked(verifier):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = (f"import socket\ntry:\n"
                   f"    socket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')\n"
                   f"    print(int(input()) * 2)\nexcept OSError:\n    print('blocked')")
        [(reward, reason)] = verifier([fenced(program)], [DOUBLE])
        with pytest.raises(BlockingIOError):
            server.accept()
    assert (reward, reason) == (0.0, "wrong")


def test_many_candidates_run_in_parallel(verifier, monkeypatch):
    running, most = [], []
    lock, original = threading.Lock(), code.run_tests

    def counting_run_tests(*args, **kwargs):
        with lock:
            running.append(1)
            most.append(len(running))
        try:
            return original(*args, **kwargs)
        finally:
            with lock:
                running.pop()

    monkeypatch.setattr(code, "run_tests", counting_run_tests)
    sleepy = fenced("import time\ntime.sleep(0.5)\nprint(int(input()) * 2)")
    spec = Spec(normalize_tests(DOUBLE).cases[:1])
    assert verifier([sleepy] * 4, [spec] * 4) == [(1.0, "correct")] * 4
    assert max(most) == 2  # both slots busy at once, never more
