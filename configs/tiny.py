"""The embedded default: a tiny random Qwen3 on the toy arrow-walk task, on CPU, in minutes.

No downloads: the tokenizer and the data are generated into the workdir. The task
(`hsd_jax.data.toy_problem`): "Follow 8 arrows from 2:" and a table of six arrows ("1>3", "2>4",
...), answered one arrow per line ("2>4", "4>5", ...) and boxed: lookups, no arithmetic, and a
failed walk leaves a successful one at its first wrong arrow, where HSD's credit should land.
Every arrow line is one token, so a lookup is one attention hop for the 2-layer model. 2000
training walks; the 64 held-out walks (`toy_split`) never share a question with them.

A 400-step supervised warm-up makes pi_0 a solver that knows the way but slips: the student's
format learns walks in which each arrow goes wrong with probability `data.toy_slip_rate` (0.3),
and the teacher's two formats (peer + answer, answer alone) learn the same walks without their
slips (`warmup.warmup_batch`). So with a context the teacher does not slip, on the peer's path
or after the response leaves it, and HSD's distillation has something to teach. Then HSD runs as
on a pod, with held-out avg@4 logged at step 0 (the warmed-up pi_0) and every 10 steps.

Measured (benchmarks/RESULTS.md, "Tiny default"; 2-core CPU), held-out accuracy at steps 0 / 10 /
20 / 30 / 40, seeds 0, 1, 2: 0.30 / 0.53 / 0.89 / 1.00 / 1.00, 0.21 / 0.60 / 1.00 / 1.00 / 1.00,
0.33 / 0.67 / 0.96 / 1.00 / 1.00. pi_0 sits near the coverage formula's p* (0.26 for G = 8).
Stable learning rates: 5e-5 (the default); at 1e-4 (measured after a warm-up at slip rate 0.25)
HSD reaches 0.96 by step 10, then collapses to short outputs (0.45 at step 40).

    python main.py --config configs/tiny.py
    python main.py --config configs/tiny.py:grpo   # a baseline on the same task
"""

import ml_collections

from configs.base import base_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.workdir = "runs/tiny_" + (variant or "hsd")
    c.model.arch = ml_collections.ConfigDict(
        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=True,
             max_position_embeddings=512)
    )
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.kind = "toy"
    c.data.toy_examples = 2000
    c.data.toy_slip_rate = 0.3
    c.data.questions_per_step = 4
    c.data.max_prompt_len = 80
    c.data.enable_thinking = False
    c.sampling.max_new_tokens = 48
    c.sampling.cache_dtype = "float32"
    c.hindsight.max_teacher_len = 192
    # One shape each for responses, student rows and teacher rows: one compile of each step.
    c.hindsight.buckets = (64, 96, 128, 192, 512)  # 512: the longer rows of the toy code task (data.mixture)
    # A compact teacher context: the toy tokenizer spells most text character by character.
    c.hindsight.template = ml_collections.ConfigDict(
        dict(answer_open="\nAnswer: ", answer_close="", demo_open="\nSolution:\n", demo_close="", context_close="")
    )
    c.optimizer.learning_rate = 5e-5  # HSD at 1e-4 collapses after 20 steps (RESULTS "Tiny default")
    c.mesh.shape = (1, -1, 1)
    c.train.steps = 40
    c.train.micro_batch = 32
    c.train.sft_warmup_steps = 400
    c.train.checkpoint_every = 10
    c.train.eval_samples = 4
    c.train.eval_every = 10
    return c
