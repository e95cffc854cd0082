"""Code sandbox: correct programs pass; adversarial programs score 0 within their limits, the test
process survives and nothing outside the sandbox changes.

Safety first: a hostile program runs only where the sandbox contains it. Programs that signal
other processes or leave their session run only where the sandbox gives them a uid of their own
(a root caller, see `code.runs_as_caller`); programs that write outside their directory also need
the fresh mounts of isolation "root". Where the sandbox keeps the tester's uid ("userns", or not
root) the tests opt in (`allow_same_uid`) and run only programs that the rlimits, the wall-clock
kill and the output cap bound; a root test also checks that path as an unprivileged uid. Limits
are small so a containment bug cannot hurt the (shared) machine: 256 MiB, 8 processes, 1 MiB of
output; programs meant to be killed get 2 s, all others 30 s (slack for a loaded machine)."""
import dataclasses
import inspect
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hsd_jax.rewards import Scorer, code
from hsd_jax.rewards.code import (
    CodeVerifier,
    SameUidRefused,
    SandboxLimits,
    extract_code,
    normalize_tests,
    run_tests,
    sandbox_isolation,
    sandbox_uid,
)
from hsd_jax.rewards.code import TestSpec as Spec

REPO = pathlib.Path(__file__).resolve().parents[1]
ISOLATION = sandbox_isolation()
SAME_UID = code.runs_as_caller(ISOLATION)
LIMITS = SandboxLimits(timeout_s=30.0, memory_bytes=256 << 20, max_processes=8,
                       max_output_bytes=1 << 20, allow_same_uid=SAME_UID)
KILLED_LIMITS = dataclasses.replace(LIMITS, timeout_s=2.0)  # for programs that must time out
NOBODY = 65534
own_uid_only = pytest.mark.skipif(
    SAME_UID, reason=f"at isolation {ISOLATION!r} as uid {os.geteuid()} the program would keep "
    "the tester's uid and could signal its processes: contained only when run as root")
needs_root_isolation = pytest.mark.skipif(
    ISOLATION != "root", reason=f"isolation {ISOLATION!r}: only the 'root' level (own uid and "
    "fresh mounts) keeps a program from writing the tester's files")
needs_namespaces = pytest.mark.skipif(ISOLATION == "none",
                                      reason="network isolation needs namespaces")
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
    """No process of the sandbox uids survives (waits up to 30 s for the kernel to reap them)."""
    deadline = time.monotonic() + 30.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(num_workers=2, limits=LIMITS)


@pytest.fixture(scope="module")
def killing_verifier():
    return CodeVerifier(num_workers=1, limits=KILLED_LIMITS)


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
    with open(REPO / "examples" / "code.jsonl") as f:
        rows = [json.loads(line) for line in f][:2]
    completions = [fenced("a, b = map(int, input().split())\nprint(a + b)"),
                   fenced("import math\nprint(math.factorial(int(input())))")]
    with Scorer("code", num_workers=2, code_limits=LIMITS) as scorer:
        rewards, reasons = scorer(rows, completions, truncated=[False, True])
    np.testing.assert_array_equal(rewards, [1.0, 0.0])
    assert reasons == ["correct", "truncated"]


# name -> (program, reasons it may score with). Each is bounded by the rlimits, the wall clock or
# the output cap alone, so it runs at every isolation level (as the tester's uid where need be).
BOUNDED = {
    "infinite_loop": ("while True:\n    pass", {"timeout"}),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))",
                    {"runtime_error", "timeout"}),
    "gigabyte_of_output": (("import sys\nline = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                           "    sys.stdout.write(line)"), {"output_limit"}),
    "sys_exit_before_output": ("import sys\nsys.exit(0)\nprint(int(input()) * 2)", {"wrong"}),
    "os_exit_before_output": ("import os\nos._exit(0)\nprint(int(input()) * 2)", {"wrong"}),
    "fills_the_disk": (("with open('big', 'wb') as f:\n    while True:\n"
                       "        f.write(b'x' * (1 << 20))"), {"runtime_error"}),
}
# Programs that start processes: contained only when they run under a uid of their own.
SPAWNING = {
    "fork_bomb": (("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                  "        pass"), {"timeout", "runtime_error"}),
    "escaping_children": (
        ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        os.setsid()\n"
        "        time.sleep(60)\n        os._exit(0)"), {"wrong"}),
}


def score_adversarial(verifier, killing_verifier, program, reasons):
    """Scores `program` on DOUBLE (with the 2 s limit if it may time out): 0 with an allowed
    reason, and no sandbox process left behind."""
    chosen = killing_verifier if "timeout" in reasons else verifier
    [(reward, reason)] = chosen([fenced(program)], [DOUBLE])
    assert reward == 0.0 and reason in reasons
    assert_no_leftovers()


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_bounded_adversarial_program_scores_zero(verifier, killing_verifier, name):
    score_adversarial(verifier, killing_verifier, *BOUNDED[name])


@own_uid_only
@pytest.mark.parametrize("name", sorted(SPAWNING))
def test_spawning_program_scores_zero_and_leaves_nothing(verifier, killing_verifier, name):
    score_adversarial(verifier, killing_verifier, *SPAWNING[name])


def test_wall_clock_kills_a_sleeping_program(killing_verifier):
    start = time.monotonic()
    program = "import time\ntime.sleep(3600)\nprint(42)"
    assert killing_verifier([fenced(program)], [DOUBLE]) == [(0.0, "timeout")]
    # Not a speed requirement: without the kill this call would take an hour.
    assert time.monotonic() - start < 600
    assert_no_leftovers()


@own_uid_only
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


@needs_root_isolation
def test_writing_outside_its_directory_changes_nothing(verifier, tmp_path):
    targets = [str(tmp_path / "escape.txt"), f"/tmp/hsd-escape-{os.getpid()}.txt",
               f"/var/tmp/hsd-escape-{os.getpid()}.txt", str(REPO / "escape.txt")]
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


def test_caller_uid_is_refused_without_opt_in(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # what any user but root sees
    assert code.runs_as_caller("none") and code.runs_as_caller("userns")
    with pytest.raises(SameUidRefused, match=r"SandboxLimits\(allow_same_uid=True\)"):
        CodeVerifier(num_workers=1, limits=dataclasses.replace(LIMITS, allow_same_uid=False))
    with pytest.raises(SameUidRefused, match="uid 1000"):
        code.run_program("print(1)", b"", dataclasses.replace(LIMITS, allow_same_uid=False))


def unprivileged_outcomes(code_path: str) -> dict:
    """What the sandbox does for a caller that is not root, at each isolation it offers
    (`isolate` True and False): the refusal without the opt-in, and with it the status and first
    output line of bounded programs. Stdlib only (it runs as another uid in a fresh interpreter,
    loading code.py by path), returning plain JSON values."""
    import dataclasses
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("sandbox_code", code_path)
    sandbox = sys.modules["sandbox_code"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sandbox)
    limits = sandbox.SandboxLimits(timeout_s=30.0, memory_bytes=256 << 20, max_processes=8,
                                   max_output_bytes=1 << 20)
    allowed = dataclasses.replace(limits, allow_same_uid=True)
    programs = {
        "double": ("import os\nprint(int(input()) * 2, os.getuid())", allowed),
        "loop": ("while True:\n    pass", dataclasses.replace(allowed, timeout_s=2.0)),
        "output": ("import sys\nsys.stdout.write('x' * (4 << 20))", allowed),
        "memory": ("x = bytearray(1 << 30)", allowed),
        "big_file": ("open('big', 'wb').write(b'x' * (32 << 20))", allowed),
    }
    outcomes = {"uid": sandbox.os.getuid()}
    for isolate in (True, False):
        try:
            sandbox.CodeVerifier(1, limits, isolate=isolate)
            refusal = None
        except sandbox.SameUidRefused as e:
            refusal = str(e)
        runs = {}
        for name, (program, run_limits) in programs.items():
            result = sandbox.run_program(program, b"21\n", run_limits, isolate=isolate)
            runs[name] = [result.status, result.stdout[:40].decode()]
        outcomes[str(isolate)] = {"level": sandbox.sandbox_isolation(isolate),
                                  "refusal": refusal, "runs": runs}
    return outcomes


def others_can(path: str, permission: int) -> bool:
    """Whether users other than the owner have `permission` (0o004 read, 0o001 run) on `path`
    and can search every directory above it."""
    real = pathlib.Path(os.path.realpath(path))
    return bool(os.stat(real).st_mode & permission) and all(
        os.stat(p).st_mode & 0o001 for p in real.parents)


def outcomes_as_unprivileged_uid() -> dict:
    """`unprivileged_outcomes` as this (non-root) process, or as root in a fresh interpreter run
    as uid nobody (skips if no Python install is reachable for it)."""
    code_path = os.path.realpath(code.__file__)
    if os.geteuid() != 0:
        return unprivileged_outcomes(code_path)
    interpreters = (sys.executable, shutil.which("python3", path=os.defpath))
    interpreter = next((p for p in interpreters if p and others_can(p, 0o001)), None)
    if interpreter is None or not others_can(code_path, 0o004):
        pytest.skip("no Python install that uid nobody can run")
    source = (inspect.getsource(unprivileged_outcomes)
              + f"\nimport json\nprint(json.dumps(unprivileged_outcomes({code_path!r})))\n")
    done = subprocess.run([interpreter, "-I", "-c", source], user=NOBODY, group=NOBODY,
                          extra_groups=[], cwd="/", env={"PATH": os.defpath},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_unprivileged_caller_gets_a_refusal_or_the_bounded_sandbox():
    outcomes = outcomes_as_unprivileged_uid()
    assert outcomes["uid"] != 0
    for isolate in ("True", "False"):
        got = outcomes[isolate]
        assert got["level"] in ("userns", "none")
        assert "SandboxLimits(allow_same_uid=True)" in got["refusal"]
        program_uid = 0 if got["level"] == "userns" else outcomes["uid"]  # root of its userns
        assert got["runs"] == {
            "double": ["ok", f"42 {program_uid}\n"],
            "loop": ["timeout", ""],
            "output": ["output_limit", "x" * 40],
            "memory": ["runtime_error", ""],
            "big_file": ["runtime_error", ""],
        }
