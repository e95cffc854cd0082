"""benchmarks/accelerator_check.py --tiny: every row of the accelerator table runs (CPU dry run)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator_check.py"
ROWS = ["parity fp32", "parity bf16", "update MFU grpo", "update MFU hsd", "hsd / grpo update", "decode static",
        "decode continuous", "loss fused-grad vs naive", "loss autodiff vs naive"]


def test_tiny_run_writes_a_table_with_every_row(tmp_path):
    out = tmp_path / "table.txt"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = out.read_text().splitlines()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
             if line.startswith("| ") and not line.startswith("| check")}
    assert list(cells) == ROWS
    status = {row: c[-1] for row, c in cells.items()}
    assert "error" not in status.values(), cells
    # torch is a test dependency: parity runs, and the float32 port matches transformers on the CPU
    assert status["parity fp32"] == "ok" and status["parity bf16"] == "ok", cells
    # both decode engines run (the comparison with the HBM floor says nothing on CPU)
    assert status["decode static"] in {"ok", "below goal"} and status["decode continuous"] in {"ok", "below goal"}, cells
    assert set(status.values()) <= {"ok", "below goal", "info", "skipped"}
    assert "\n".join(lines) in done.stdout  # the same table is printed
