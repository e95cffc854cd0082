"""Code verification: run model-written Python programs against test cases in a sandbox.

Test formats (`normalize_tests`): APPS style `{"inputs": [...], "outputs": [...]}` with an
optional `"fn_name"`, or LiveCodeBench style `[{"input": ..., "output": ...}, ...]` (with
`"testtype": "functional"` and a `fn_name` given separately), either one possibly as a JSON string.
stdin/stdout tests feed `input` on stdin and compare stdout with `output` line by line (trailing
whitespace ignored, numbers compared with a 1e-6 tolerance). Function-call tests call `fn_name`
(a top-level function, or a method of a LeetCode-style `class Solution`) with the JSON list of
positional arguments in `input` and compare its return value with `output` after a JSON round
trip. Reward 1 iff every test passes; a candidate stops at its first failing test.

Isolation: what the sandbox does
- Each test runs in a fresh process tree: a small launcher (`python -I -S`) in its own session
  (`start_new_session`) and a fresh temporary directory, with stdin from a file, stdout to a pipe
  read by the parent up to `max_output_bytes` (4 MiB), stderr discarded, a minimal environment,
  and none of the trainer's file descriptors.
- Resource limits (setrlimit, inherited by everything the program starts): RLIMIT_CPU (timeout
  + 1 s), RLIMIT_AS (address space, 1 GiB), RLIMIT_FSIZE (largest file written, 16 MiB),
  RLIMIT_NPROC (16 processes/threads), RLIMIT_NOFILE (64 open files), RLIMIT_CORE 0.
- Wall clock: at `timeout_s` (10 s per test) or on too much output the whole process group is
  SIGKILLed.
- Namespaces and users, by level (`sandbox_isolation()` says which one this machine gets):
  "root" (root with CAP_SYS_ADMIN, e.g. our containers and pods): the launcher unshares fresh
    network, PID and mount namespaces (`unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS)`).
    The program is PID 1 of its PID namespace, so every process it starts dies with it, even ones
    that leave the session, and it cannot see or signal any process outside; it has only a
    loopback interface that is down (no network at all); `/tmp`, `/var/tmp` and `/dev/shm` are
    fresh size-capped tmpfs mounts (64 MiB) and `/proc` shows only the sandbox; and it runs as an
    unprivileged uid of its own (`sandbox_uid`: one per trainer process and parallel slot), so
    RLIMIT_NPROC counts only its own processes and it cannot write the trainer's files. A
    directory other users cannot enter (e.g. /root) that holds the Python install is hidden
    behind an empty tmpfs with the install bind-mounted back.
  "userns" (not root, unprivileged user namespaces allowed): the same network, PID and mount
    namespaces inside a user namespace (`CLONE_NEWUSER`), but the program keeps the trainer's
    uid: it can read and write whatever the trainer can outside the three tmpfs mounts, and
    RLIMIT_NPROC counts all of that user's processes (so it can hardly fork at all).
  "none" (no namespaces allowed): rlimits, session and temp dir only; the program HAS network
    access. As root it still runs as its own uid (this needs the Python install readable by other
    users; `CodeVerifier` checks and says how to fix it) and every process of that uid is killed
    after each test; as another user it runs as the trainer's user, can signal the trainer and
    touch its files, and processes that leave the session can outlive the test.
The caller's own uid: opt-in only
- Where the program would run under the caller's uid (level "userns", or any caller that is not
  root), `run_program` (and so `CodeVerifier`, `Scorer("code")` and the trainer) refuses with
  `SameUidRefused` unless `SandboxLimits(allow_same_uid=True)` is passed: such a program can
  signal every process of that user (`kill(-1)`), and write its files. `runs_as_caller()` says
  whether this machine is in that case. Opt in only for trusted programs or a throwaway user.
What it is not
- Not a security boundary against a determined attacker: there is no seccomp filter, no
  read-only root filesystem and no cgroup. The program can read every world-readable file
  (including dataset files with the expected outputs, if it can find them) and write to any
  world-writable directory other than the tmpfs mounts. Memory is bounded per process by
  RLIMIT_AS, so one sandbox can touch up to `max_processes * memory_bytes` in total.
- Expected outputs never enter the sandbox: comparisons happen in the trainer's process, so a
  program that tampers with the in-sandbox driver (patching `json`, returning objects whose
  `__eq__` is always true, exiting 0 early, printing "PASSED") only corrupts its own output.

Reasons: "correct", "wrong" (wrong output), "runtime_error" (non-zero exit, killed by a signal,
failed rlimit), "timeout", "output_limit", "no_answer" (no code block), "error" (bad test spec).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import queue
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_PROGRAM = "solution.py"
_STDIN = "stdin.txt"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one test run. `uid_base`: start of the sandbox users' uid range (root only;
    see `sandbox_uid`). `allow_same_uid`: run programs even where they keep the caller's uid
    (see "The caller's own uid" above); off by default."""
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    max_processes: int = 16
    max_open_files: int = 64
    max_output_bytes: int = 4 << 20
    tmpfs_bytes: int = 64 << 20
    uid_base: int = 1_000_000
    allow_same_uid: bool = False


class SameUidRefused(RuntimeError):
    """The sandbox would run a program under the caller's own uid without the opt-in."""


@dataclasses.dataclass(frozen=True)
class TestCase:
    """One test: stdin text and expected stdout, or JSON args and expected return value."""
    input: Any
    output: Any


@dataclasses.dataclass(frozen=True)
class TestSpec:
    """The tests of a problem; `fn_name` None means stdin/stdout style."""
    cases: tuple[TestCase, ...]
    fn_name: str | None = None


MAX_SLOTS = 256


def sandbox_uid(limits: SandboxLimits, slot: int) -> int:
    """The uid a sandbox runs as (when started as root): `uid_base + 256 * pid + slot`, unique
    to this process and slot, so concurrent sandboxes, even of other trainer processes on the
    host, never share a uid (and an RLIMIT_NPROC count)."""
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be in [0, {MAX_SLOTS}), got {slot}")
    return limits.uid_base + MAX_SLOTS * os.getpid() + slot


def normalize_tests(tests: Any, fn_name: str | None = None) -> TestSpec:
    """Parses APPS-style `{"inputs", "outputs", "fn_name"?}` or LiveCodeBench-style
    `[{"input", "output", "testtype"?}]` tests (either possibly a JSON string) into a TestSpec.
    Function-call inputs are JSON lists of positional args (a JSON string, or newline-separated
    JSON values as in LiveCodeBench). Raises ValueError naming what is wrong."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"tests: not valid JSON ({e})") from None
    if isinstance(tests, dict):
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError("tests: a dict needs lists 'inputs' and 'outputs' (APPS style)")
        if len(inputs) != len(outputs):
            raise ValueError(f"tests: {len(inputs)} inputs but {len(outputs)} outputs")
        fn_name = tests.get("fn_name") or fn_name
        pairs = list(zip(inputs, outputs))
    elif isinstance(tests, list):
        if not all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
            raise ValueError("tests: a list must hold dicts with 'input' and 'output' keys "
                             "(LiveCodeBench style)")
        if any(t.get("testtype") == "functional" for t in tests) and not fn_name:
            raise ValueError("tests: functional tests need fn_name")
        pairs = [(t["input"], t["output"]) for t in tests]
    else:
        raise ValueError(f"tests: expected a dict, list or JSON string, got {type(tests).__name__}")
    if not pairs:
        raise ValueError("tests: no test cases")
    if fn_name:
        cases = tuple(TestCase(_call_args(i), _json_value(o)) for i, o in pairs)
    else:
        if not all(isinstance(i, str) and isinstance(o, str) for i, o in pairs):
            raise ValueError("tests: stdin/stdout tests need string inputs and outputs "
                             "(set fn_name for function-call tests)")
        cases = tuple(TestCase(i, o) for i, o in pairs)
    return TestSpec(cases, fn_name or None)


def _json_value(value: Any) -> Any:
    """A test's value, decoding JSON text (LiveCodeBench stores values as JSON strings)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _call_args(value: Any) -> list:
    """Positional args of a function-call test: a list, JSON text of one, or JSON lines."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            return [json.loads(line) for line in value.splitlines() if line.strip()]
        except json.JSONDecodeError:
            pass
    raise ValueError(f"tests: function-call input must be a JSON list of args, got {value!r:.80}")


def _render_case(case: TestCase, fn_name: str | None) -> str:
    """One test as text: an assert line for a function-call test, else its stdin and stdout."""
    if fn_name:
        return f"assert {fn_name}({', '.join(map(repr, case.input))}) == {case.output!r}"
    return f"Input:\n{case.input.rstrip(chr(10))}\nExpected output:\n{case.output.rstrip(chr(10))}"


def render_tests(spec: TestSpec, max_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The tests of `spec` as text for a teacher to read (HSD's reference a* for code).

    Each stdin/stdout test reads `Input:\n<stdin>\nExpected output:\n<stdout>` (trailing newlines
    dropped), tests separated by a blank line; each function-call test is one line
    `assert fn_name(arg, ...) == expected` (Python literals). Whole tests are kept in order while
    the text stays within `max_tokens` tokens as `count_tokens` counts them; when some are left
    out, a last line says so: `(3 of 5 tests not shown)`. If not even the first test fits, the
    text is that line alone. Only the tests up to the first one that does not fit are counted.
    """
    blocks = [_render_case(case, spec.fn_name) for case in spec.cases]
    separator = "\n" if spec.fn_name else "\n\n"

    def text(shown: int) -> str:
        left_out = len(blocks) - shown
        note = [f"({left_out} of {len(blocks)} tests not shown)"] if left_out else []
        return "\n\n".join([separator.join(blocks[:shown])] * bool(shown) + note)

    prefix_tokens, used = [], 0  # prefix_tokens[i]: tokens of the first i + 1 tests
    for i, block in enumerate(blocks):
        used += count_tokens(separator + block if i else block)
        if used > max_tokens:
            break
        prefix_tokens.append(used)
    if len(prefix_tokens) == len(blocks) and count_tokens(text(len(blocks))) <= max_tokens:
        return text(len(blocks))
    note_tokens = count_tokens(text(0))  # a cut bundle's note is part of the budget
    shown = sum(1 for tokens in prefix_tokens if tokens + note_tokens <= max_tokens)
    while shown and count_tokens(text(shown)) > max_tokens:  # counts of parts need not add up
        shown -= 1
    return text(shown)


def extract_code(completion: str) -> str | None:
    """The last fenced Python (or untagged) code block after the last `</think>`, else None."""
    _head, sep, tail = completion.rpartition("</think>")
    blocks = _CODE_BLOCK.findall(tail if sep else completion)
    return blocks[-1] if blocks else None


def _lines_equal(actual: str, expected: str) -> bool:
    """stdout comparison: per line, trailing whitespace and trailing blank lines ignored;
    tokens that are numbers compare with a 1e-6 tolerance."""
    a = [line.rstrip() for line in actual.rstrip().splitlines()]
    e = [line.rstrip() for line in expected.rstrip().splitlines()]
    if a == e:
        return True
    if len(a) != len(e):
        return False
    return all(_tokens_equal(x.split(), y.split()) for x, y in zip(a, e))


def _tokens_equal(actual: list[str], expected: list[str]) -> bool:
    if len(actual) != len(expected):
        return False
    for x, y in zip(actual, expected):
        if x == y:
            continue
        try:
            if not math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


def _values_equal(actual: Any, expected: Any) -> bool:
    """Return-value comparison after a JSON round trip; floats with a 1e-6 tolerance."""
    if isinstance(actual, float) or isinstance(expected, float):
        if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
            return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-6)
        return False
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(map(_values_equal, actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(
            _values_equal(actual[k], expected[k]) for k in actual)
    return type(actual) is type(expected) and actual == expected


# The launcher: runs as the trainer's user, enters namespaces, forks the program's process
# (PID 1 of the new PID namespace where there is one), which sets rlimits, drops root and execs
# Python on the program. It exits with the program's status (128 + signal when killed).
_LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def enter_namespaces():
    if not cfg["isolate"]:
        return "none"
    if libc.unshare(NEWNET | NEWPID | NEWNS) == 0:
        return "root"
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(NEWUSER | NEWNET | NEWPID | NEWNS) == 0:
        write("/proc/self/setgroups", "deny")
        write("/proc/self/uid_map", f"0 {uid} 1")
        write("/proc/self/gid_map", f"0 {gid} 1")
        return "userns"
    return "none"

def mount(source, target, fstype, flags, data):
    if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")

def blocked_ancestor(path):
    """The topmost directory above `path` that other users cannot enter (e.g. /root), or None."""
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None

def under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")

def private_filesystem(program):
    """Fresh tmpfs on /tmp, /var/tmp, /dev/shm and over directories the sandbox uid cannot
    enter (hiding their contents), with the Python install bind-mounted back into place."""
    mount("none", "/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE
    hide = [t for t in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(t)]
    if os.geteuid() == 0:
        hide += [a for a in map(blocked_ancestor, cfg["python_paths"]) if a and a not in hide]
    keep = [(os.open(p, os.O_PATH), p) for p in cfg["python_paths"]
            if any(under(p, top) for top in hide)]
    for top in hide:
        mount("tmpfs", top, "tmpfs", 0, f"size={cfg['tmpfs_bytes']},mode=1777"
              if top in ("/tmp", "/var/tmp", "/dev/shm") else "size=1m,mode=755")
    for fd, path in keep:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, 0x1000 | 0x4000, None)  # MS_BIND | MS_REC
        os.close(fd)
    mount("proc", "/proc", "proc", 0, None)
    workdir = "/tmp/sandbox"
    os.mkdir(workdir, 0o700)
    write(os.path.join(workdir, "solution.py"), program)
    return workdir

def set_limits():
    t = cfg["cpu_s"]
    for name, value in (("CPU", (t, t + 1)), ("AS", cfg["memory_bytes"]),
                        ("FSIZE", cfg["file_bytes"]), ("NPROC", cfg["max_processes"]),
                        ("NOFILE", cfg["max_open_files"]), ("CORE", 0)):
        value = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), value)

level = enter_namespaces()
if cfg["probe"]:
    print(level)
    sys.exit(0)
pid = os.fork()
if pid == 0:
    try:
        workdir = cfg["workdir"]
        if level != "none":
            with open(os.path.join(workdir, "solution.py")) as f:
                workdir = private_filesystem(f.read())
        if level != "userns" and os.geteuid() == 0:
            os.chown(workdir, cfg["uid"], cfg["uid"])
            os.chdir(workdir)
            set_limits()
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        else:
            os.chdir(workdir)
            set_limits()
        env = dict(cfg["env"], HOME=workdir, TMPDIR=workdir)
        os.execve(sys.executable, [sys.executable] + cfg["argv"], env)
    except BaseException as e:
        os.write(2, f"sandbox launcher: {e!r}\n".encode())
    os._exit(125)
_, status = os.waitpid(pid, 0)
os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''

# Function-call driver, run inside the sandbox: silences the program's own stdout, calls the
# function with the args read from stdin and writes the JSON of its return value to stdout.
_DRIVER = r'''
import json, os, sys
result_fd = os.dup(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
args = json.loads(sys.stdin.read())
namespace = {"__name__": "solution"}
with open("solution.py") as f:
    exec(compile(f.read(), "solution.py", "exec"), namespace)
fn_name = sys.argv[1]
if fn_name in namespace:
    fn = namespace[fn_name]
else:
    fn = getattr(namespace["Solution"](), fn_name)
sys.stdout.flush()
os.write(result_fd, json.dumps(fn(*args)).encode())
'''

_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _launcher_config(limits: SandboxLimits, workdir: str, uid: int, argv: list[str], *,
                     isolate: bool, probe: bool = False) -> str:
    return json.dumps({
        "isolate": isolate, "probe": probe, "workdir": workdir, "uid": uid, "argv": argv,
        "env": _ENV, "python_paths": _python_paths(), "cpu_s": math.ceil(limits.timeout_s) + 1,
        "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
        "max_processes": limits.max_processes, "max_open_files": limits.max_open_files,
        "tmpfs_bytes": limits.tmpfs_bytes})


def _python_paths() -> list[str]:
    """Directories the sandboxed interpreter needs: its prefixes and the executable's dir."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix,
                                           os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(p for p in paths if not any(q != p and p.startswith(q + "/") for q in paths))


@functools.cache
def sandbox_isolation(isolate: bool = True) -> str:
    """Which isolation this machine gives: "root", "userns" or "none" (see module docstring).
    Probed once per process by starting the launcher."""
    config = _launcher_config(SandboxLimits(), tempfile.gettempdir(), 0, [],
                              isolate=isolate, probe=True)
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, config],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def runs_as_caller(isolation: str) -> bool:
    """Whether a sandboxed program keeps the caller's uid at `isolation` (a level of
    `sandbox_isolation`): only a root caller can switch it, and not inside a user namespace."""
    return isolation == "userns" or os.geteuid() != 0


def check_uid_policy(limits: SandboxLimits, isolate: bool = True) -> None:
    """Raises SameUidRefused where programs would run under the caller's uid without
    `limits.allow_same_uid`; the message says why and how to opt in."""
    isolation = sandbox_isolation(isolate)
    if limits.allow_same_uid or not runs_as_caller(isolation):
        return
    raise SameUidRefused(
        f"the code sandbox would run untrusted programs under your own uid {os.geteuid()} "
        f"(isolation {isolation!r}): they could signal every process of that user and write its "
        "files. Run as root with CAP_SYS_ADMIN (each program then gets a uid of its own), or "
        "opt in with SandboxLimits(allow_same_uid=True) (Scorer('code', code_limits=...)) for "
        "trusted programs or a throwaway user")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run: "ok" (exit 0), "runtime_error", "timeout", "output_limit"."""
    status: str
    stdout: bytes
    returncode: int | None


def run_program(program: str, stdin: bytes, limits: SandboxLimits = SandboxLimits(), *,
                fn_name: str | None = None, slot: int = 0, isolate: bool = True) -> RunResult:
    """Runs `program` (or calls its `fn_name` with the JSON args in `stdin`) once in the sandbox.

    `slot` picks the sandbox uid (`sandbox_uid`); concurrent runs of one process must use
    distinct slots. `isolate=False` skips the namespaces (rlimits, session and temp dir only).
    Raises SameUidRefused where the program would keep the caller's uid without the opt-in.
    """
    check_uid_policy(limits, isolate)
    workdir = tempfile.mkdtemp(prefix="hsd-sandbox-")
    try:
        with open(os.path.join(workdir, _PROGRAM), "w") as f:
            f.write(program)
        stdin_path = os.path.join(workdir, _STDIN)
        with open(stdin_path, "wb") as f:
            f.write(stdin)
        argv = ["-I", "-c", _DRIVER, fn_name] if fn_name else ["-I", _PROGRAM]
        uid = sandbox_uid(limits, slot)
        config = _launcher_config(limits, workdir, uid, argv, isolate=isolate)
        with open(stdin_path, "rb") as stdin_file:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _LAUNCHER, config], stdin=stdin_file,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=workdir,
                env=_ENV, start_new_session=True)
        try:
            status, stdout = _read_output(process, limits)
        finally:
            _kill_group(process)
            if sandbox_isolation(isolate) == "none":
                _kill_uid(uid)
        if status == "ok" and process.returncode != 0:
            status = "runtime_error"
        return RunResult(status, stdout, process.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read_output(process: subprocess.Popen, limits: SandboxLimits) -> tuple[str, bytes]:
    """Reads stdout until EOF or the launcher exits, then waits for the launcher's exit status;
    stops early at the deadline or the output cap."""
    deadline = time.monotonic() + limits.timeout_s
    chunks, size = [], 0
    fd = process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while process.poll() is None or selector.select(0):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", b"".join(chunks)
            if not selector.select(min(remaining, 0.05)):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limits.max_output_bytes:
                return "output_limit", b"".join(chunks)[:limits.max_output_bytes]
    try:
        process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "timeout", b"".join(chunks)
    return "ok", b"".join(chunks)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs the run's whole process group and reaps the launcher."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    process.stdout.close()


def _kill_uid(uid: int) -> None:
    """As root, SIGKILLs every process of the sandbox uid: catches processes that left the
    session where there is no PID namespace to end them. A no-op for other users."""
    if os.geteuid() != 0:
        return
    subprocess.run(["/bin/sh", "-c", "kill -9 -1"],
                   user=uid, group=uid, extra_groups=[], env=_ENV, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_tests(program: str, spec: TestSpec, limits: SandboxLimits = SandboxLimits(), *,
              slot: int = 0, isolate: bool = True) -> tuple[float, str]:
    """Runs `program` on each test of `spec` in turn; (1.0, "correct") iff all pass, else
    (0.0, reason of the first failure)."""
    for case in spec.cases:
        if spec.fn_name:
            stdin = json.dumps(case.input).encode()
        else:
            stdin = case.input.encode()
        result = run_program(program, stdin, limits, fn_name=spec.fn_name, slot=slot,
                             isolate=isolate)
        if result.status != "ok":
            return 0.0, result.status
        if not _passes(result.stdout, case, spec.fn_name is not None):
            return 0.0, "wrong"
    return 1.0, "correct"


def _passes(stdout: bytes, case: TestCase, functional: bool) -> bool:
    text = stdout.decode("utf-8", errors="replace")
    if not functional:
        return _lines_equal(text, case.output)
    try:
        return _values_equal(json.loads(text), case.output)
    except json.JSONDecodeError:
        return False


class CodeVerifier:
    """Scores candidate programs in parallel, `num_workers` sandboxes at a time (default: all
    cores). `verifier(completions, tests, fn_names=None)` returns one (reward, reason) each.
    On creation it probes the isolation level (`.isolation`), refuses (SameUidRefused) where
    programs would keep the caller's uid without `limits.allow_same_uid`, and checks that a
    trivial program runs, raising RuntimeError with the fix if the sandbox cannot run Python."""

    def __init__(self, num_workers: int | None = None, limits: SandboxLimits = SandboxLimits(),
                 isolate: bool = True):
        self._num_workers = num_workers or os.cpu_count() or 1
        if self._num_workers > MAX_SLOTS:
            raise ValueError(f"num_workers must be <= {MAX_SLOTS}, got {self._num_workers}")
        self._limits, self._isolate = limits, isolate
        self.isolation = sandbox_isolation(isolate)
        check = run_program("print('ok')", b"", limits, isolate=isolate)
        if check.stdout.strip() != b"ok":
            raise RuntimeError(
                f"the code sandbox cannot run Python (isolation {self.isolation!r}, exit "
                f"{check.returncode}): as root without namespaces the sandbox uid "
                f"{sandbox_uid(limits, 0)} needs to reach and read {sys.base_prefix} and "
                f"{sys.prefix}; "
                "make them (and their parent directories) world-readable, or allow unshare "
                "(CAP_SYS_ADMIN)")
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self._num_workers):
            self._slots.put(slot)

    def __call__(self, completions: Sequence[str], tests: Sequence[Any],
                 fn_names: Sequence[str | None] | None = None) -> list[tuple[float, str]]:
        if len(completions) != len(tests):
            raise ValueError(f"got {len(completions)} completions but {len(tests)} test sets; "
                             "pass one test set per completion")
        fn_names = fn_names or [None] * len(completions)
        with ThreadPoolExecutor(self._num_workers) as executor:
            return list(executor.map(self._score_one, completions, tests, fn_names))

    def _score_one(self, completion: str, tests: Any, fn_name: str | None) -> tuple[float, str]:
        try:
            spec = tests if isinstance(tests, TestSpec) else normalize_tests(tests, fn_name)
        except ValueError:
            return 0.0, "error"
        program = extract_code(completion)
        if program is None:
            return 0.0, "no_answer"
        slot = self._slots.get()
        try:
            return run_tests(program, spec, self._limits, slot=slot, isolate=self._isolate)
        finally:
            self._slots.put(slot)
