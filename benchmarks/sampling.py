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
    args = parser.parse_args()
    if args.gpu_floor:
        gpu_floor(args)
    else:
        args.hidden = args.hidden or 512
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
