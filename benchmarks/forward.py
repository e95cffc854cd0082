"""Forward throughput of the Flax Qwen3 port vs transformers' PyTorch Qwen3, same random weights.

Both run the decoder to the final hidden states (no LM head: losses apply it in chunks) on the
same batch, in float32 on the CPU. Also prints the compile time of a shallow vs a deep config,
which scanned layers keep nearly equal.

    python benchmarks/forward.py [--hidden 1024 --layers 8 --batch 4 --length 512]
"""

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from benchmarks import machine
from models import hf, qwen3


def best_time(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compile_seconds(config, batch, length):
    graphdef, state = nnx.split(qwen3.abstract_model(config))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def forward(state, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return nnx.merge(graphdef, state)(tokens, positions)[0]

    start = time.perf_counter()
    jax.jit(forward).lower(state, tokens).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    hf_config = transformers.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    reference = transformers.Qwen3ForCausalLM(hf_config).float().eval()
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        model = hf.load_model(path)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.length))
    n_tokens = tokens.size

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return nnx.merge(graphdef, state)(tokens, positions)[0]

    jax_tokens = jnp.asarray(tokens)
    jax_s = best_time(lambda: forward(state, jax_tokens).block_until_ready(), args.repeats)
    torch_tokens = torch.as_tensor(tokens)
    with torch.inference_mode():
        torch_s = best_time(lambda: reference.model(torch_tokens).last_hidden_state, args.repeats)

    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"shape: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.length}")
    print(f"hsd-jax forward:      {n_tokens / jax_s:10.0f} tokens/s ({jax_s * 1e3:.0f} ms)")
    print(f"transformers forward: {n_tokens / torch_s:10.0f} tokens/s ({torch_s * 1e3:.0f} ms)")
    print(f"ratio hsd-jax / transformers: {torch_s / jax_s:.2f}x")
    c = model.config
    layer_params = qwen3.count_params(c) - c.vocab_size * c.hidden_size
    attention = 2 * 2 * args.batch * args.length**2 / 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
    flops = 2 * layer_params * n_tokens + attention
    print(f"matmul work {flops / 1e9:.0f} GFLOP: hsd-jax {flops / jax_s / 1e9:.0f} GFLOP/s, transformers {flops / torch_s / 1e9:.0f} GFLOP/s")

    base = qwen3.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128, head_dim=128,
    )
    shallow = compile_seconds(qwen3.Qwen3Config(**{**base.__dict__, "num_hidden_layers": 8}), args.batch, args.length)
    deep = compile_seconds(qwen3.Qwen3Config(**{**base.__dict__, "num_hidden_layers": 64}), args.batch, args.length)
    print(f"compile time: 8 layers {shallow:.2f} s, 64 layers {deep:.2f} s (ratio {deep / shallow:.2f}x)")


if __name__ == "__main__":
    with machine.reporting_load():
        main()
