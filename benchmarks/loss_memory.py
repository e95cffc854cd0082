"""Peak memory and time of value+grad of KL(teacher || student): fused chunked vs naive full logits.

The naive baseline materialises both ``[B, T, V]`` logit arrays; the fused one is
``hsd_jax.losses.distill_divergence`` (chunks of positions under rematerialisation; it also returns
the student logprobs, entropy and credit). Both take the gradient w.r.t. the student hidden states
and the LM head, in float32, and are measured in the same process.

Peak memory is XLA's compiled memory analysis (arguments + outputs + temporaries), available
without running, so it is reported at every size. Time (best of ``--reps`` interleaved calls after
a warm-up) is measured only where the naive footprint is below ``--max_run_gib``, to spare the
shared machine.

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


def fused_kl(chunk_size: int):
    def f(teacher, student, head, targets):
        out = losses.distill_divergence(teacher, student, head, targets, chunk_size=chunk_size)
        return jnp.mean(out.divergence)

    return f


def compile_value_and_grad(fn, args):
    """Compiled ``value_and_grad`` w.r.t. student and head, and its peak bytes."""
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(1, 2))).lower(*args).compile()
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
    return compiled, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, nargs="+", default=[1024, 8192], help="B*T (B = 8)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 1024], help="fused chunk sizes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max_run_gib", type=float, default=8.0, help="time naive only below this")
    a = p.parse_args()
    print(f"{jax.devices()[0].device_kind} x{len(jax.devices())}, D={a.dim} V={a.vocab}, float32")
    for n in a.positions:
        args = make_inputs(n, a.dim, a.vocab)
        fns = {"naive": naive_kl, **{f"fused chunk={c}": fused_kl(c) for c in a.chunks}}
        compiled, peak = {}, {}
        for name, fn in fns.items():
            compiled[name], peak[name] = compile_value_and_grad(fn, args)
        run = peak["naive"] <= a.max_run_gib * GIB
        times = {name: [] for name in fns}
        for rep in range(a.reps + 1 if run else 0):  # rep 0 warms up; interleaved: shared noise
            for name, f in compiled.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                times[name] += [time.perf_counter() - t0] if rep else []
        print(f"B*T = {n}" + ("" if run else f" (naive > {a.max_run_gib} GiB: compiled, not run)"))
        for name in fns:
            share = peak[name] / peak["naive"]
            line = f"  {name:18s} peak {peak[name] / GIB:6.2f} GiB ({share:6.1%})"
            if run:
                t = min(times[name])
                line += f"   time {t:7.2f} s ({t / min(times['naive']):.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
