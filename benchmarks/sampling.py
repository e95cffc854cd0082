"""Generated tokens/s of hsd_jax.sampling.generate vs transformers' generate, and the matmul floor.

Both run the same random Qwen3 weights (built with transformers, saved, loaded by
models.hf.load_model), the same batch of random prompts, and top-p 0.95 at temperature 1.0 with
no EOS, so both produce exactly batch x new_tokens tokens. Compile time is reported apart.

The matmul floor of a decode step is 2 x matmul params x batch FLOPs over the best float32
matmul FLOP/s measured here (a square GEMM and the LM-head-shaped GEMM, in JAX and in torch);
"fraction of floor" is floor time / measured time per generated token step.

    python benchmarks/sampling.py                                  # hidden 512, 8 layers, V=151936
    python benchmarks/sampling.py --hidden 128 --layers 2 --vocab 8192 --new_tokens 16   # smoke run

--gpu_floor (run it on a GPU): an 8B-shaped model (hidden 4096, 32 heads, 8 kv heads, MLP 12288,
untied head) with fewer layers in bfloat16; it times one decode step as the difference of two
generate calls (new_tokens and new_tokens / 2, so prefill cancels) and compares it with the HBM
floor: bytes of weights + KV cache read per step over the measured device copy bandwidth.

--lengths longtail: the static engine (`sampling.generate`, all rows in one batch) and the
continuous one (`sampling.generate_continuous`, --slots decode slots) on the same random Qwen3
(built in JAX) and the same rows, each row forced to end (EOS) at a length drawn from a
lognormal (sigma 1) with mean a quarter of --new_tokens, capped at it; the static engine also
in calls of --slots rows (the same KV-cache size as the continuous engine, as the trainer's
rows_per_call). Prints decode-slot utilisation and tokens/s (generated tokens, compile excluded).

    python benchmarks/sampling.py --lengths longtail --hidden 256 --layers 4 --vocab 32768
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import machine
from hsd_jax import sampling
from models import hf, qwen3


def matmul_params(config: qwen3.Qwen3Config) -> int:
    """Parameters that take part in a matmul per token: the layer projections and the LM head."""
    D, F, N, K, H = (config.hidden_size, config.intermediate_size, config.num_attention_heads,
                     config.num_key_value_heads, config.head_dim)
    per_layer = D * N * H * 2 + D * K * H * 2 + D * F * 3
    return config.num_hidden_layers * per_layer + D * config.vocab_size


def best_time(fn, repeats: int) -> float:
    """Minimum wall time of `fn()` (blocking) over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(batch: int, hidden: int, vocab: int) -> dict[str, float]:
    """Measured float32 FLOP/s: a 2048^3 GEMM and the [batch, hidden] x [hidden, vocab] GEMM, JAX and torch."""
    import torch

    rates = {}
    for name, (m, k, n) in {"square": (2048, 2048, 2048), "head": (batch, hidden, vocab)}.items():
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        rates[f"jax {name}"] = 2 * m * k * n / best_time(lambda: jnp.dot(a, b), 3)
        ta, tb = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
        rates[f"torch {name}"] = 2 * m * k * n / best_time(lambda: ta @ tb, 3)
    return rates


def build_checkpoint(args, path: str):
    """A random transformers Qwen3 saved to `path`; returns the torch model (eval, float32)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, tie_word_embeddings=True, max_position_embeddings=4096,
    )
    model = transformers.Qwen3ForCausalLM(config).float().eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def time_transformers(model, prompts: np.ndarray, args) -> float:
    """Seconds for transformers' generate (sampling, top-p, no EOS) on the whole batch."""
    import torch

    ids = torch.as_tensor(prompts, dtype=torch.long)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=args.temperature,
            top_p=args.top_p, top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
            eos_token_id=None, pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape == (len(prompts), prompts.shape[1] + args.new_tokens), out.shape
    return elapsed


def time_jax(graphdef, params, prompts: list[list[int]], config: sampling.SamplingConfig, repeats: int,
             generate=sampling.generate):
    """(seconds of the first call incl. compile, best seconds of `repeats` later calls) of
    `generate` (an engine with `sampling.generate`'s signature)."""
    run = lambda seed: generate(graphdef, params, prompts, jax.random.key(seed), config)
    start = time.perf_counter()
    out = jax.block_until_ready(run(0))
    first = time.perf_counter() - start
    assert int(out.lengths.min()) == config.max_new_tokens
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(run(seed))
        times.append(time.perf_counter() - start)
    return first, min(times)


def generate_continuous_one_slot_per_row(graphdef, params, prompts: list[list[int]], key: jax.Array,
                                         config: sampling.SamplingConfig) -> sampling.Rollouts:
    """`sampling.generate_continuous` with one decode slot per row (P * n slots) -> Rollouts [P * n].

    `sampling.generate`'s signature as `time_jax` calls it, so `decode_floor` times the continuous
    engine like the static one: every slot busy on the same batch, a per-step cost comparable.
    """
    out, _ = sampling.generate_continuous(graphdef, params, prompts, key, config, slots=len(prompts) * config.n)
    return out


def cpu_benchmark(args) -> None:
    import torch

    print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab, (args.batch, args.prompt_len))
    with tempfile.TemporaryDirectory() as path:
        torch_model = build_checkpoint(args, path)
        model = hf.load_model(path)
    graphdef, params = nnx.split(model)
    n_matmul = matmul_params(model.config)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{qwen3.count_params(model.config) / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in matmuls); "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"top_p {args.top_p}, temperature {args.temperature}")

    config = sampling.SamplingConfig(
        max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
        prompt_buckets=(args.prompt_len,), cache_dtype=args.cache_dtype,
    )
    first, jax_s = time_jax(graphdef, params, prompts.tolist(), config, args.repeats)
    tokens = args.batch * args.new_tokens
    print(f"hsd_jax:      {tokens / jax_s:8.1f} tokens/s  ({jax_s * 1e3 / args.new_tokens:6.1f} ms/step, "
          f"{jax_s:.2f} s; compile {first - jax_s:.1f} s)")
    if args.skip_transformers:
        return
    hf_s = time_transformers(torch_model, prompts, args)
    print(f"transformers: {tokens / hf_s:8.1f} tokens/s  ({hf_s * 1e3 / args.new_tokens:6.1f} ms/step, {hf_s:.2f} s)")
    print(f"ratio hsd_jax / transformers: {hf_s / jax_s:.2f}x")

    rates = matmul_flops(args.batch, args.hidden, args.vocab)
    best = max(rates, key=rates.get)
    floor_s = 2 * n_matmul * args.batch / rates[best]
    print("matmul FLOP/s: " + ", ".join(f"{k} {v / 1e9:.0f} G" for k, v in rates.items()))
    print(f"matmul floor: {floor_s * 1e3:.1f} ms/step (best: {best}); fraction of floor reached: "
          f"hsd_jax {floor_s * args.new_tokens / jax_s:.2f}, transformers {floor_s * args.new_tokens / hf_s:.2f}")


def copy_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s of a device copy (read + write) of a `gib` GiB bfloat16 array."""
    x = jnp.zeros((int(gib * 2**30) // 2,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + jnp.ones((), x.dtype))
    return 2 * x.nbytes / best_time(lambda: copy(x), 5)


def decode_floor(config: qwen3.Qwen3Config, batch: int, prompt_len: int, new_tokens: int, *, top_p: float = 0.95,
                 temperature: float = 1.0, repeats: int = 1, generate=sampling.generate,
                 copy_gib: float = 1.0) -> dict[str, float]:
    """One decode step of `generate` (default the static engine) vs the HBM floor, for a random
    model of `config`.

    The step is the difference of two generate calls (new_tokens and new_tokens / 2, so prefill
    cancels) over the token difference; the floor is the bytes of weights + KV cache read per
    step (bfloat16 cache) over the measured device copy bandwidth. Returns step_s, floor_s,
    weight_bytes, cache_bytes, bandwidth (bytes/s) and slots (cache length).
    """
    graphdef, params = nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_len)).tolist()
    sampling_config = lambda new: sampling.SamplingConfig(
        max_new_tokens=new, top_p=top_p, temperature=temperature, prompt_buckets=(prompt_len,), cache_dtype="bfloat16",
    )
    long, short = new_tokens, new_tokens // 2
    _, long_s = time_jax(graphdef, params, prompts, sampling_config(long), repeats, generate)
    _, short_s = time_jax(graphdef, params, prompts, sampling_config(short), repeats, generate)
    step_s = (long_s - short_s) / (long - short)

    embed_bytes = config.vocab_size * config.hidden_size * jnp.dtype(config.param_dtype).itemsize
    # every weight is read once per step, except the embedding (a gather) unless it is also the head
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - (0 if config.tie_word_embeddings else embed_bytes)
    slots = prompt_len + long - 1
    cache_bytes = 2 * config.num_hidden_layers * batch * slots * config.num_key_value_heads * config.head_dim * 2
    bandwidth = copy_bandwidth(copy_gib)
    return dict(step_s=step_s, floor_s=(weight_bytes + cache_bytes) / bandwidth, weight_bytes=weight_bytes,
                cache_bytes=cache_bytes, bandwidth=bandwidth, slots=slots)


def gpu_floor(args) -> None:
    """Decode step time of an 8B-shaped model (args.layers layers) vs the HBM floor."""
    if jax.default_backend() == "cpu":
        print("warning: --gpu_floor is meant for a GPU; running on CPU, the numbers say nothing about HBM.")
    shape = {} if args.hidden is None else {"hidden_size": args.hidden, "intermediate_size": 3 * args.hidden}
    config = qwen3.Qwen3Config.preset(
        "8b", num_hidden_layers=args.layers, param_dtype="bfloat16", dtype="bfloat16", **shape
    )
    r = decode_floor(config, args.batch, args.prompt_len, args.new_tokens, top_p=args.top_p,
                     temperature=args.temperature, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; 8B-shaped, {config.num_hidden_layers} layers, batch {args.batch}, "
          f"{r['slots']} cache slots, bfloat16")
    print(f"bytes/step: weights {r['weight_bytes'] / 2**30:.2f} GiB + KV cache {r['cache_bytes'] / 2**30:.2f} GiB; "
          f"copy bandwidth {r['bandwidth'] / 1e9:.0f} GB/s")
    print(f"decode step {r['step_s'] * 1e3:.2f} ms vs HBM floor {r['floor_s'] * 1e3:.2f} ms: "
          f"fraction of floor {r['floor_s'] / r['step_s']:.2f}")


def longtail_lengths(rows: int, limit: int, seed: int = 0) -> np.ndarray:
    """Per-row stop lengths: lognormal (sigma 1) with mean limit / 4, rounded, clipped to [1, limit]."""
    sigma = 1.0
    mu = np.log(limit / 4) - sigma**2 / 2
    return np.clip(np.round(np.random.default_rng(seed).lognormal(mu, sigma, rows)), 1, limit).astype(np.int32)


def longtail_benchmark(args) -> None:
    """Static vs continuous engine on long-tailed forced lengths: utilisation and tokens/s."""
    config = qwen3.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate or 3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=4096,
    )
    graphdef, _ = nnx.split(qwen3.abstract_model(config))
    params = jax.jit(lambda: nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))[1])()
    prompts = np.random.default_rng(1).integers(0, args.vocab - 1, (args.batch, args.prompt_len)).tolist()
    lengths = longtail_lengths(args.batch, args.new_tokens)
    sampling_config = sampling.SamplingConfig(
        max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
        eos_ids=(args.vocab - 1,), prompt_buckets=(args.prompt_len,), cache_dtype=args.cache_dtype,
    )
    print(f"devices: {jax.devices()}")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{qwen3.count_params(config) / 1e6:.1f}M params; {args.batch} rows, prompt {args.prompt_len}, "
          f"limit {args.new_tokens}, forced lengths mean {lengths.mean():.1f} (max {lengths.max()}, "
          f"{np.sum(lengths == args.new_tokens)} at the limit); top_p {args.top_p}, temperature {args.temperature}")
    key = jax.random.key(0)

    def static(rows_per_call: int, forced: np.ndarray):
        """`generate` over consecutive calls of rows_per_call rows -> (tokens [rows, M], DecodeStats)."""
        calls = [sampling.generate(graphdef, params, prompts[i:i + rows_per_call], jax.random.fold_in(key, i),
                                   sampling_config, forced_lengths=forced[i:i + rows_per_call])
                 for i in range(0, args.batch, rows_per_call)]
        stats = [sampling.static_stats(out) for out in calls]
        total = sampling.DecodeStats(rows_per_call, sum(s.decode_steps for s in stats), sum(s.useful_tokens for s in stats))
        return np.concatenate([np.asarray(out.tokens) for out in calls]), total

    def continuous(forced: np.ndarray):
        out, stats = sampling.generate_continuous(  # the key of static's first (for all rows: only) call
            graphdef, params, prompts, jax.random.fold_in(key, 0), sampling_config, slots=args.slots,
            steps_per_call=args.steps_per_call, refill_at=args.refill_at, forced_lengths=forced)
        return np.asarray(out.tokens), stats

    # warm-up (compiles): the static programs with every row ending at once; the continuous engine's
    # programs depend on its schedule, so it warms up on the timed workload itself
    engines = {
        "static, all rows": (lambda forced: static(args.batch, forced), np.ones_like(lengths)),
        f"static, {args.slots} rows/call": (lambda forced: static(args.slots, forced), np.ones_like(lengths)),
        f"continuous, {args.slots} slots": (continuous, lengths),
    }
    results = {}
    for name, (run, warm_up) in engines.items():
        if name.startswith("static") and args.slots == args.batch and "rows/call" in name:
            continue
        start = time.perf_counter()
        run(warm_up)
        first = time.perf_counter() - start
        start = time.perf_counter()
        tokens, stats = run(lengths)
        seconds = time.perf_counter() - start
        results[name] = tokens
        generated = stats.useful_tokens + args.batch
        print(f"{name:26s} utilisation {stats.utilisation:.3f} ({stats.decode_steps} steps x {stats.slots} slots)  "
              f"{generated / seconds:8.1f} tokens/s ({seconds:.2f} s; warm-up {first:.1f} s)")
    static_tokens, continuous_tokens = results["static, all rows"], results[f"continuous, {args.slots} slots"]
    same = np.all(static_tokens == continuous_tokens, axis=1)
    print(f"rows identical, static (all rows) vs continuous: {same.sum()} / {len(same)}; rows differ where float "
          "rounding (different batch sizes) moves a draw across a token boundary of the near-uniform random model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=None, help="default 512 (CPU run) / 4096 (--gpu_floor)")
    parser.add_argument("--intermediate", type=int, default=0, help="MLP size (0 = 3 x hidden)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--cache_dtype", default=None, help="KV cache dtype (default: the model's, float32)")
    parser.add_argument("--repeats", type=int, default=1, help="timed hsd_jax calls after the compiling one")
    parser.add_argument("--skip_transformers", action="store_true")
    parser.add_argument("--gpu_floor", action="store_true", help="8B-shaped decode step vs HBM floor (GPU)")
    parser.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                        help="longtail: static vs continuous engine on long-tailed forced stop lengths")
    parser.add_argument("--slots", type=int, default=16, help="continuous engine's decode slots (--lengths longtail)")
    parser.add_argument("--steps_per_call", type=int, default=16, help="continuous engine's decode steps per call")
    parser.add_argument("--refill_at", type=int, default=1,
                        help="continuous engine: free slots (with nothing staged) that end a decode call to stage more")
    args = parser.parse_args()
    if args.lengths == "longtail":
        args.hidden = args.hidden or 256
        longtail_benchmark(args)
    elif args.gpu_floor:
        gpu_floor(args)
    else:
        args.hidden = args.hidden or 512
        cpu_benchmark(args)


if __name__ == "__main__":
    with machine.reporting_load():
        main()
