"""Cost of one jitted update: HSD (teacher + student + reference passes, fused full-vocabulary
KL) vs GRPO (student + reference passes, sampled-token PG), same model, same batch.

The paper's PyTorch stack: update 15.2 s (HSD) vs 2.3 s (GRPO), 6.6x. Here both run
`trainer.update_step` in one process; the baseline is GRPO.

    python -m benchmarks.update_cost [--hidden 512 --layers 4 --rows 16 --response 192]
"""

import argparse
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import machine
from hsd_jax import batch as batch_lib
from hsd_jax import losses, trainer
from models import qwen3


def make_batch(rows: int, prompt: int, context: int, response: int, vocab: int, seed: int = 0) -> batch_lib.TrainBatch:
    """Right-padded student [q ; o] and teacher [q ; c ; o] rows with full-length responses."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, prompt + context + response), dtype=np.int32)

    def rows_of(prefix: int) -> batch_lib.ModelRows:
        seq = np.concatenate([tokens[:, :prefix], tokens[:, -response:]], axis=1)
        return batch_lib.ModelRows(
            tokens=seq,
            positions=np.broadcast_to(np.arange(prefix + response, dtype=np.int32), seq.shape),
            gather_index=np.broadcast_to(prefix - 1 + np.arange(response, dtype=np.int32), (rows, response)),
        )

    return batch_lib.TrainBatch(
        student=rows_of(prompt),
        teacher=rows_of(prompt + context),
        response_tokens=tokens[:, -response:],
        response_mask=np.ones((rows, response), np.float32),
        distill_mask=np.ones(rows, np.float32),
        advantages=rng.normal(size=rows).astype(np.float32),
        sampler_logprobs=np.zeros((rows, response), np.float32),
    )


def time_update(name: str, graphdef, params, train_batch: batch_lib.TrainBatch, repeats: int) -> tuple[float, float]:
    """(fastest of `repeats` updates, first call incl. compile) in seconds, for loss preset `name`."""
    length = train_batch.response_tokens.shape[1]  # DAPO's overlong buffer fits the response limit, as in a run
    cfg = losses.preset(name, max_response_length=length,
                        overlong_buffer=min(losses.preset(name).overlong_buffer, length // 4))
    optimizer = optax.adamw(1e-6)
    step = jax.jit(partial(trainer.update_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg, micro_batches=1))
    state = trainer.init_state(params, optimizer)
    start = time.perf_counter()
    jax.block_until_ready(step(state, params, train_batch))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(state, params, train_batch))
        times.append(time.perf_counter() - start)
    return min(times), compile_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--context", type=int, default=128, help="teacher context tokens (answer + peer)")
    parser.add_argument("--response", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--losses", nargs="+", default=["grpo", "hsd"])
    args = parser.parse_args()

    config = qwen3.Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        head_dim=64, tie_word_embeddings=True,
    )
    graphdef, params = nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))
    train_batch = jax.tree.map(jnp.asarray, make_batch(args.rows, args.prompt, args.context, args.response, args.vocab))
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} ({qwen3.count_params(config) / 1e6:.0f}M params); "
          f"{args.rows} rows, prompt {args.prompt}, teacher context {args.context}, response {args.response}")
    results = {name: time_update(name, graphdef, params, train_batch, args.repeats) for name in args.losses}
    baseline = results[args.losses[0]][0]
    for name, (seconds, compile_s) in results.items():
        print(f"{name:10s} update {seconds * 1e3:8.0f} ms  ({seconds / baseline:.2f}x {args.losses[0]})  compile {compile_s:.1f} s")


if __name__ == "__main__":
    with machine.reporting_load():
        main()
