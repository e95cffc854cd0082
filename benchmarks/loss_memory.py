"""Peak memory and time of value+grad of KL(teacher || student): naive, chunked autodiff, chunked
with the gradient computed in the forward pass.

The naive baseline materialises both ``[B, T, V]`` logit arrays. The two chunked ones are
``hsd_jax.losses.chunked_objective`` (the ``hsd`` preset without reference KL, token-mean: the
mean KL over positions; it also returns the student logprobs, entropy and credit) with
``fused_grad=False`` (autodiff through rematerialised chunks: the backward recomputes teacher and
student logits) and ``fused_grad=True`` (a ``custom_vjp`` whose chunks emit the gradient while
their logits are live). All take the gradient w.r.t. the student hidden states and the LM head,
in float32, and are measured in the same process.

Peak memory is XLA's compiled memory analysis (arguments + outputs + temporaries), available
without running, so it is reported at every size. Time (best of ``--reps`` interleaved calls after
a warm-up) is measured only where the naive footprint is below ``--max_run_gib``, to spare the
shared machine. The load average is printed at start and end: ratios taken under foreign load
show as such.

    python benchmarks/loss_memory.py                                  # V=151936, D=1024
    python benchmarks/loss_memory.py --positions 512 --vocab 8192 --chunks 128   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from benchmarks import machine  # noqa: E402
from hsd_jax import losses  # noqa: E402

GIB = 2**30


def make_inputs(positions: int, dim: int, vocab: int):
    """``teacher, student [8, T, D]``, ``head [D, V]``, ``targets [8, T]`` with 8 T = positions."""
    r = np.random.default_rng(0)
    shape = (8, positions // 8)
    teacher = r.standard_normal((*shape, dim), np.float32)
    student = r.standard_normal((*shape, dim), np.float32)
    head = r.standard_normal((dim, vocab), np.float32) / np.sqrt(dim)
    return tuple(map(jnp.asarray, (teacher, student, head, r.integers(0, vocab, shape))))


def naive_kl(teacher, student, head, targets):
    del targets
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher @ head))
    s_logp = jax.nn.log_softmax(student @ head)
    return jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1))


def chunked_kl(chunk_size: int, fused_grad: bool):
    """Mean KL(teacher || student) through ``losses.chunked_objective``."""
    cfg = losses.preset("hsd", beta=0.0, agg="token-mean", chunk_size=chunk_size, fused_grad=fused_grad)

    def f(teacher, student, head, targets):
        inputs = losses.LossInputs(None, jnp.ones(targets.shape, jnp.float32))
        return losses.chunked_objective(student, head, targets, inputs, cfg, teacher_hidden=teacher)[0]

    return f


def variants(chunks: list[int]) -> dict:
    """Name -> loss function of ``(teacher, student, head, targets)``."""
    fns = {"naive": naive_kl}
    for c in chunks:
        fns[f"autodiff chunk={c}"] = chunked_kl(c, fused_grad=False)
        fns[f"fused-grad chunk={c}"] = chunked_kl(c, fused_grad=True)
    return fns


def compile_value_and_grad(fn, args):
    """Compiled ``value_and_grad`` w.r.t. student and head, and its peak bytes."""
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(1, 2))).lower(*args).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return compiled, peak


def measure(positions: int, dim: int, vocab: int, chunks: list[int], reps: int,
            max_run_gib: float = float("inf")) -> dict[str, tuple[float, float | None]]:
    """Name -> (peak bytes, best seconds or None) of every variant's value+grad at ``positions``.

    Times are taken (``reps`` interleaved calls after a warm-up) only if naive's peak is below
    ``max_run_gib``.
    """
    args = make_inputs(positions, dim, vocab)
    compiled, peak = {}, {}
    for name, fn in variants(chunks).items():
        compiled[name], peak[name] = compile_value_and_grad(fn, args)
    run = peak["naive"] <= max_run_gib * GIB
    times = {name: [] for name in compiled}
    for rep in range(reps + 1 if run else 0):  # rep 0 warms up; interleaved: shared noise
        for name, f in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name] += [time.perf_counter() - t0] if rep else []
    return {name: (peak[name], min(times[name]) if run else None) for name in compiled}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, nargs="+", default=[1024, 8192], help="B*T (B = 8)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="chunk sizes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max_run_gib", type=float, default=8.0, help="time naive only below this")
    a = p.parse_args()
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, D={a.dim} V={a.vocab}, float32")
    for n in a.positions:
        results = measure(n, a.dim, a.vocab, a.chunks, a.reps, a.max_run_gib)
        naive_peak, naive_time = results["naive"]
        print(f"B*T = {n}" + ("" if naive_time else f" (naive > {a.max_run_gib} GiB: compiled, not run)"))
        for name, (peak, seconds) in results.items():
            line = f"  {name:24s} peak {peak / GIB:6.2f} GiB ({peak / naive_peak:6.1%})"
            if seconds is not None:
                line += f"   time {seconds:7.2f} s ({seconds / naive_time:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    with machine.reporting_load():
        main()
