"""The machine's CPU count and load average, printed at the start and end of every benchmark run,
so that a ratio measured while other work shared the machine shows as such."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def load() -> str:
    """CPU count and the 1-, 5- and 15-minute load averages, e.g. "2 CPUs, load average 1.52 1.80 2.01"."""
    return f"{os.cpu_count()} CPUs, load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def reporting_load() -> Iterator[None]:
    """Prints `load()` on entering (start of the run) and on leaving (its end, also after an error)."""
    print(f"machine at start: {load()}", flush=True)
    try:
        yield
    finally:
        print(f"machine at end: {load()}", flush=True)
