"""One prepared check for a GPU or TPU machine: prints one table and writes it to a file.

Rows (each measured in this process; a row that fails reports its error and the rest still run):
  parity fp32 / bf16    models/qwen3.py vs transformers (PyTorch on the host CPU, float32) on the
                        same random weights: max |logit difference| / max |reference logit| and
                        top-1 agreement. fp32 runs at matmul precision "highest". Skipped without torch.
  update MFU hsd/grpo   one jitted `trainer.update_step` (micro_batches=1, AdamW) of an 8B-shaped
                        model with `--layers` layers on one micro-batch at the recipe's lengths;
                        model FLOPs (student forward+backward, teacher and reference forwards, LM
                        head at response positions, causal attention) / time / peak bf16 FLOP/s.
  hsd / grpo update     the ratio of those two update times.
  decode <engine>       one decode step of the 8B-shaped model vs the HBM floor (weights + KV
                        cache bytes over the measured copy bandwidth), per engine of DECODE_ENGINES:
                        static (`sampling.generate`) and continuous (`sampling.generate_continuous`
                        with one decode slot per row, on the same batch).
  fused loss            value+grad of the mean full-vocabulary KL, V = 151936, D = 4096, 8 x 1024
                        positions: naive full logits vs `losses.chunked_objective` with the gradient
                        in the forward pass (fused_grad) and by autodiff; time and compiled peak.

Install on the machine: `pip install -r requirements.txt "jax[cuda13]"` (torch, for the parity
rows, only if it is already there). Run from the repository root:

    python benchmarks/accelerator_check.py [--out accelerator_check.txt] [--layers 4]
    python benchmarks/accelerator_check.py --tiny      # every row at tiny sizes: a CPU dry run

Goals (issue 13) on an H100/H200: update MFU >= 45 %, decode >= 60 % of the HBM floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import loss_memory, machine, sampling as sampling_bench, update_cost  # noqa: E402
from hsd_jax import losses, sampling  # noqa: E402
from models import hf, qwen3  # noqa: E402

# Decode engines compared with the HBM floor: name -> a function with `sampling.generate`'s
# signature (as `sampling_bench.time_jax` calls it); the continuous engine gets one slot per row.
DECODE_ENGINES = {"static": sampling.generate, "continuous": sampling_bench.generate_continuous_one_slot_per_row}

# Dense bfloat16 peak FLOP/s by device kind (vendor datasheets); other devices use a measured GEMM.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v6 lite": 918e12, "TPU v5p": 459e12,
             "TPU v5 lite": 197e12, "TPU v4": 275e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of every row. `model` overrides the 8B preset (besides the layer count)."""

    parity: dict  # transformers Qwen3 shape for the parity rows
    parity_tokens: tuple[int, int]  # [B, T]
    model: dict
    update: dict  # update_cost.make_batch arguments except vocab: rows, prompt, context, response
    decode: dict  # batch, prompt_len, new_tokens
    loss: dict  # positions, dim, vocab, chunk
    copy_gib: float
    gemm: int  # side of the measured bf16 GEMM (peak where the device is not in PEAK_BF16)


FULL = Sizes(
    parity=dict(vocab=151936, hidden=1024, intermediate=3072, layers=4, heads=16, kv_heads=8, head_dim=128),
    parity_tokens=(2, 256),
    model={},
    # the recipe (configs/base.py): one micro-batch of 8 rollouts, prompt <= 1024, response 4096;
    # the teacher row adds the reference answer and a peer's response
    update=dict(rows=8, prompt=1024, context=4096 + 256, response=4096),
    decode=dict(batch=64, prompt_len=256, new_tokens=256),
    loss=dict(positions=8192, dim=4096, vocab=151936, chunk=256),
    copy_gib=1.0,
    gemm=8192,
)
TINY = Sizes(
    parity=dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16),
    parity_tokens=(2, 12),
    model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, remat="none", dtype="float32"),
    update=dict(rows=2, prompt=6, context=6, response=8),
    decode=dict(batch=2, prompt_len=8, new_tokens=4),
    loss=dict(positions=64, dim=32, vocab=512, chunk=24),
    copy_gib=0.01,
    gemm=256,
)


@dataclasses.dataclass
class Row:
    check: str
    result: str
    goal: str = ""
    status: str = "info"  # ok | below goal | info | skipped | error


def model_config(sizes: Sizes, layers: int) -> qwen3.Qwen3Config:
    """The 8B shape with `layers` layers, bfloat16 compute, float32 params (the recipe's)."""
    recipe = dict(num_hidden_layers=layers, param_dtype="float32", dtype="bfloat16", remat="full")
    return qwen3.Qwen3Config.preset("8b", **{**recipe, **sizes.model})


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


def parity_rows(sizes: Sizes) -> list[Row]:
    """models/qwen3.py on the accelerator vs transformers float32 on the host, fp32 and bf16."""
    try:
        import torch
    except ImportError:
        return [Row(f"parity {d}", "torch not installed", status="skipped") for d in ("fp32", "bf16")]
    tokens = np.random.default_rng(0).integers(0, sizes.parity["vocab"], sizes.parity_tokens)
    goals = {"fp32": 1e-4, "bf16": 3e-2}
    with tempfile.TemporaryDirectory() as path:
        reference = sampling_bench.build_checkpoint(types.SimpleNamespace(**sizes.parity), path)
        with torch.no_grad():
            want = reference(torch.as_tensor(tokens)).logits.float().numpy()
        rows = []
        for name, dtype, precision in (("fp32", "float32", "highest"), ("bf16", "bfloat16", "default")):
            graphdef, state = nnx.split(hf.load_model(path, param_dtype=dtype, dtype=dtype))
            with jax.default_matmul_precision(precision):
                got = np.asarray(jax.jit(functools.partial(_logits, graphdef))(state, jnp.asarray(tokens)))
            error = np.abs(got - want).max() / np.abs(want).max()
            top1 = (got.argmax(-1) == want.argmax(-1)).mean()
            rows.append(Row(f"parity {name}", f"max abs diff / max abs logit {error:.1e}, top-1 agreement {top1:.3f}",
                            f"<= {goals[name]:.0e}", "ok" if error <= goals[name] else "below goal"))
    return rows


def _logits(graphdef, state, tokens: jax.Array) -> jax.Array:
    """float32 logits [B, T, V] of tokens [B, T]."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.logits(model(tokens, positions)[0])


def forward_flops(config: qwen3.Qwen3Config, rows: int, length: int) -> float:
    """Decoder-layer FLOPs of a forward pass over rows x length tokens (causal attention)."""
    layers = sampling_bench.matmul_params(config) - config.hidden_size * config.vocab_size
    attention = 2 * 2 * rows * length**2 / 2 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    return 2 * layers * rows * length + attention


def update_flops(config: qwen3.Qwen3Config, cfg: losses.LossConfig, rows: int, prompt: int, context: int,
                 response: int) -> float:
    """Model FLOPs of one update: student forward + backward (3x), teacher and reference
    forwards where the loss reads them, the LM head at the response positions of each pass.
    Rematerialisation is not counted (MFU, not hardware utilisation)."""
    head = 2 * config.hidden_size * config.vocab_size * rows * response
    flops = 3 * (forward_flops(config, rows, prompt + response) + head)
    if cfg.needs_teacher:
        flops += forward_flops(config, rows, prompt + context + response) + head
    if cfg.beta > 0:
        flops += forward_flops(config, rows, prompt + response) + head
    return flops


def peak_flops(sizes: Sizes) -> tuple[float, str]:
    """(bf16 peak FLOP/s, where it comes from): the datasheet, else a measured square GEMM."""
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if name in kind:
            return peak, f"{kind} datasheet"
    n = sizes.gemm
    a = jnp.ones((n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / sampling_bench.best_time(lambda: matmul(a), 3), f"measured {n}^3 bf16 GEMM on {kind}"


def update_rows(sizes: Sizes, layers: int) -> list[Row]:
    """Update time and MFU of GRPO and HSD, and their ratio."""
    config = model_config(sizes, layers)
    graphdef, params = nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))
    batch = jax.tree.map(jnp.asarray, update_cost.make_batch(vocab=config.vocab_size, **sizes.update))
    peak, source = peak_flops(sizes)
    seconds, rows = {}, []
    for name in ("grpo", "hsd"):
        seconds[name], compile_s = update_cost.time_update(name, graphdef, params, batch, repeats=2)
        flops = update_flops(config, losses.preset(name), **sizes.update)
        mfu = flops / seconds[name] / peak
        rows.append(Row(f"update MFU {name}", f"{mfu:.1%} ({seconds[name]:.2f} s, {flops / 1e12:.1f} TFLOP, compile "
                        f"{compile_s - seconds[name]:.0f} s; peak {peak / 1e12:.0f} TFLOP/s, {source})", ">= 45 %",
                        "ok" if mfu >= 0.45 else "below goal"))
    shape = ", ".join(f"{k} {v}" for k, v in sizes.update.items())
    rows.append(Row("hsd / grpo update", f"{seconds['hsd'] / seconds['grpo']:.2f}x ({config.num_hidden_layers} "
                    f"layers x {config.hidden_size}, {shape})", "paper's PyTorch: 6.6x"))
    return rows


def decode_rows(sizes: Sizes, layers: int) -> list[Row]:
    """One decode step per engine vs the HBM floor."""
    config = dataclasses.replace(model_config(sizes, layers), param_dtype="bfloat16")
    rows = []
    for engine, generate in DECODE_ENGINES.items():
        r = sampling_bench.decode_floor(config, **sizes.decode, generate=generate, copy_gib=sizes.copy_gib)
        share = r["floor_s"] / r["step_s"]
        rows.append(Row(f"decode {engine}", f"{share:.0%} of floor ({r['step_s'] * 1e3:.2f} ms vs {r['floor_s'] * 1e3:.2f} "
                        f"ms: {(r['weight_bytes'] + r['cache_bytes']) / 2**30:.2f} GiB at {r['bandwidth'] / 1e9:.0f} GB/s; "
                        f"batch {sizes.decode['batch']}, {r['slots']} cache slots)", ">= 60 % of floor",
                        "ok" if share >= 0.6 else "below goal"))
    return rows


def loss_rows(sizes: Sizes) -> list[Row]:
    """Fused full-vocabulary KL (gradient in the forward, and autodiff) vs naive full logits."""
    s = sizes.loss
    results = loss_memory.measure(s["positions"], s["dim"], s["vocab"], [s["chunk"]], reps=3)
    naive_peak, naive_s = results["naive"]
    rows = []
    for name, goal in ((f"fused-grad chunk={s['chunk']}", "<= 1.1x time, <= 10 % memory"),
                       (f"autodiff chunk={s['chunk']}", "")):
        peak, seconds = results[name]
        ratio, share = seconds / naive_s, peak / naive_peak
        ok = ratio <= 1.1 and share <= 0.10
        rows.append(Row(f"loss {name.split()[0]} vs naive", f"{ratio:.2f}x time ({seconds * 1e3:.0f} vs {naive_s * 1e3:.0f} "
                        f"ms), {share:.1%} peak memory; {s['positions']} positions, D {s['dim']}, V {s['vocab']}",
                        goal, ("ok" if ok else "below goal") if goal else "info"))
    return rows


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def guarded(checks: list[str], run) -> list[Row]:
    """`run()`'s rows, or one error row per name in `checks` if it raises."""
    try:
        return run()
    except Exception as error:  # one failing row must not cost the rest of a scarce machine's run
        traceback.print_exc()
        return [Row(check, f"{type(error).__name__}: {error}".splitlines()[0][:200], status="error") for check in checks]


def table(rows: list[Row], header: list[str]) -> str:
    """Rows as a Markdown table under `header` lines."""
    lines = [*header, "", "| check | result | goal | status |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.result} | {r.goal} | {r.status} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="accelerator_check.txt", help="file the table is written to")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 8B-shaped model")
    p.add_argument("--tiny", action="store_true", help="every row at tiny sizes (a dry run on CPU)")
    a = p.parse_args()
    sizes = TINY if a.tiny else FULL
    layers = 1 if a.tiny else a.layers
    start, load_start = time.perf_counter(), machine.load()
    device = jax.devices()[0]
    print(f"{device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    rows = []
    steps = [(["parity fp32", "parity bf16"], lambda: parity_rows(sizes)),
             (["update MFU grpo", "update MFU hsd", "hsd / grpo update"], lambda: update_rows(sizes, layers)),
             ([f"decode {e}" for e in DECODE_ENGINES], lambda: decode_rows(sizes, layers)),
             (["loss fused-grad vs naive", "loss autodiff vs naive"], lambda: loss_rows(sizes))]
    for checks, run in steps:
        t0, cpu0 = time.perf_counter(), time.process_time()
        rows += guarded(checks, run)
        print(f"{', '.join(checks)}: {time.perf_counter() - t0:.0f} s ({time.process_time() - cpu0:.0f} s CPU)", flush=True)
    header = [f"# accelerator check ({'tiny' if a.tiny else 'full'} sizes)", "",
              f"- device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}",
              f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall "
              f"{time.perf_counter() - start:.0f} s; at start {load_start}; at end {machine.load()}"]
    text = table(rows, header)
    print(text)
    Path(a.out).write_text(text)
    print(f"written to {a.out}")


if __name__ == "__main__":
    with machine.reporting_load():
        main()
