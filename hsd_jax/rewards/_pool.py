"""A process pool whose every task has a hard wall-clock deadline.

`concurrent.futures.ProcessPoolExecutor` cannot stop a running task: a worker stuck in a C call
(sympy expanding `9**9**9`, a big-integer power) holds the GIL, ignores signals and keeps its
core forever. Here each worker is a spawned process serving one task at a time over a pipe; when
a task passes its deadline the worker is killed with SIGKILL and a fresh one is started in its
place, so the pool keeps its size and later tasks are unaffected.

Workers are started with the "spawn" method (safe in a process that already runs JAX threads)
and report "ready" only after `initializer` ran, so slow imports never count against a task's
deadline.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

# (status, value): ("ok", result), ("timeout", None) or ("error", message).
TaskResult = tuple[str, Any]


def _worker_main(conn, target: Callable, initializer: Callable | None,
                 memory_limit_bytes: int | None) -> None:
    """Worker loop: run `target(*args)` for every args tuple received, until EOF or None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle.
    if memory_limit_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
    if initializer is not None:
        initializer()
    conn.send(("ready", None))
    while True:
        try:
            args = conn.recv()
        except EOFError:
            return
        if args is None:
            return
        try:
            reply: TaskResult = ("ok", target(*args))
        except BaseException as e:  # noqa: BLE001 - any failure of a task is that task's result
            reply = ("error", f"{type(e).__name__}: {e}"[:500])
        conn.send(reply)


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


class TimeoutPool:
    """`num_workers` processes running `target(*args)` with a `timeout_s` deadline per task.

    `target` and `initializer` must be importable module-level functions (they are pickled by
    name). `memory_limit_bytes` sets RLIMIT_AS in each worker so a runaway computation fails
    with MemoryError instead of exhausting the machine. Use as a context manager or call
    `close()`; not thread-safe (one `map` at a time).
    """

    def __init__(self, target: Callable, num_workers: int, timeout_s: float, *,
                 initializer: Callable | None = None, memory_limit_bytes: int | None = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._target, self._initializer = target, initializer
        self._memory_limit_bytes = memory_limit_bytes
        self._timeout_s = timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main, daemon=True,
            args=(child_conn, self._target, self._initializer, self._memory_limit_bytes))
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _replace(self, index: int) -> None:
        worker = self._workers[index]
        worker.process.kill()
        worker.process.join()
        worker.conn.close()
        self._workers[index] = self._start_worker()

    def map(self, tasks: Sequence[tuple]) -> list[TaskResult]:
        """Runs every args tuple in `tasks`; results in order, each ("ok"|"timeout"|"error", v)."""
        results: list[TaskResult | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    w.task = pending.popleft()
                    w.conn.send(tasks[w.task])
                    w.deadline = time.monotonic() + self._timeout_s
            self._collect(results)
        return results  # type: ignore[return-value]

    def wait_ready(self) -> None:
        """Blocks until every worker has started (and run the initializer)."""
        while not all(w.ready for w in self._workers):
            self._collect([])

    def _collect(self, results: list) -> None:
        """Waits for one round of replies or deadlines and updates `results` and workers."""
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = multiprocessing.connection.wait([w.conn for w in self._workers], wait_s)
        for i, w in enumerate(self._workers):
            if w.conn in ready:
                try:
                    status, value = w.conn.recv()
                except (EOFError, OSError):
                    if not w.ready:
                        raise RuntimeError(
                            "a reward worker process died while starting; run the initializer "
                            "in a plain Python process to see its error") from None
                    if w.task is not None:
                        results[w.task] = ("error", "worker process died")
                    self._replace(i)
                    continue
                if status == "ready":
                    w.ready = True
                else:
                    results[w.task], w.task = (status, value), None
            elif w.task is not None and time.monotonic() >= w.deadline:
                results[w.task] = ("timeout", None)
                self._replace(i)

    def close(self) -> None:
        """Kills every worker (a worker may be stuck, so no polite shutdown is attempted)."""
        for w in self._workers:
            w.process.kill()
            w.process.join()
            w.conn.close()
        self._workers = []

    def __enter__(self) -> TimeoutPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
