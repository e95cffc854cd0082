"""Multi-process training for real: two JAX processes on localhost (CPU, gloo collectives, a
loopback coordinator), two simulated devices each, one mesh over both.

They must train exactly like one process with four devices on the same global batches, a
kill -9 of both followed by a restart must resume from the last checkpoint, and the model they
export at the end must be the one a single process exports.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
# Adam with eps=1 and lr=1 moves each weight by about its gradient, so a wrong batch or a wrong
# reduction shows as a difference of the gradients' size (1e-5 and up here), while float noise
# stays far below the tolerance; the warm-up runs but moves weights by at most 1e-7.
FLAGS = [
    "--config.data.toy_examples=64", "--config.data.questions_per_step=4", "--config.sampling.group_size=4",
    "--config.sampling.max_new_tokens=12", "--config.train.micro_batch=8", "--config.train.sft_warmup_steps=1",
    "--config.train.sft_learning_rate=1e-7", "--config.optimizer.learning_rate=1.0", "--config.optimizer.eps=1.0",
    f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=1", "--config.mesh.shape=(1,-1,1)",
    "--config.train.eval_every=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, processes: int, devices: int) -> list[subprocess.Popen]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, str(ROOT / "main.py"), *FLAGS, f"--config.workdir={workdir}"]
    if processes > 1:
        command += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    return [
        subprocess.Popen(command + ([f"--process_id={i}"] if processes > 1 else []), cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)
    ]


def finish(procs, timeout=600) -> list[str]:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def checkpoint_state(workdir, step):
    """The saved train state of `step` as NumPy arrays (no devices needed)."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, restore_args=as_numpy)


def exported_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of the safetensors files of a Hugging Face directory, by name."""
    tensors = {}
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(path, framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def metrics(workdir):
    return [json.loads(line) for line in open(Path(workdir) / "metrics.jsonl")]


def test_two_processes_train_like_one_and_resume_after_kill(tmp_path):
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    reference = launch(single, processes=1, devices=4)
    first = launch(multi, processes=2, devices=2)
    committed = multi / "checkpoints" / "2" / "commit_success.txt"
    deadline = time.monotonic() + 600
    while not committed.exists() and time.monotonic() < deadline and all(p.poll() is None for p in first):
        time.sleep(0.2)
    assert committed.exists(), first[0].communicate()[0][-3000:]
    for p in first:
        p.send_signal(signal.SIGKILL)
        p.wait()
    outputs = finish(launch(multi, processes=2, devices=2))
    finish(reference)

    assert any("at step 2" in line for line in outputs[0].splitlines() if line.startswith("resumed from")), outputs[0][-3000:]
    assert [r["step"] for r in metrics(multi)] == [1, 2, 3]  # the killed run's rows past step 2 are gone
    assert not any(line.startswith("step ") for line in outputs[1].splitlines())  # process 1 prints nothing

    one, two = checkpoint_state(single, STEPS), checkpoint_state(multi, STEPS)
    start = checkpoint_state(single, 1)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(start["params"])))
    assert moved > 1e-5  # steps 2 and 3 changed the weights well beyond the tolerance below
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-7)
    for a, b in zip(metrics(single), metrics(multi)):
        for key in ("reward", "response_length", "loss", "divergence", "coverage"):
            assert a[key] == b[key] or abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a, b)
    # The export at the end (train.export_at_end): each tensor gathered over both processes and
    # written once, by process 0, is the model one process exports (bfloat16: a rounding apart).
    one, two = exported_tensors(single / "hf"), exported_tensors(multi / "hf")
    assert set(one) == set(two) and len(one) > 0
    for name, tensor in one.items():
        np.testing.assert_allclose(two[name].astype(np.float32), tensor.astype(np.float32), rtol=1e-2, atol=1e-5, err_msg=name)
