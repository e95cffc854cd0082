"""The embedded default: a tiny random Qwen3 on the toy dial-walk task, on CPU, in minutes.

No downloads: the tokenizer and the data are generated into the workdir. The task
(`hsd_jax.data.toy_problem`): "What is 9-9+8+1+2 mod 10?", a start digit and 3-5 single-digit
moves on a dial of 10, solved one move per line ("9-9=0", "0+8=8", ...) and boxed: few
arithmetic facts, several choices in a row, and a failed walk leaves a successful one at the
first wrong digit, where HSD's credit should land. 2000 training walks; the 64 held-out walks
(`toy_split`) never share a question with them. A supervised warm-up on the worked solutions, in
the student's and the teacher's format, brings the success rate off zero; then HSD runs as on a
pod, with held-out avg@4 logged at step 0 (the warmed-up pi_0) and every 10 steps.

Measured (benchmarks/RESULTS.md, "Tiny default"; seed 0, 2-core CPU): pi_0 reaches 0.08 held-out
after 100 warm-up steps; about 6 CPU-minutes in all. HSD does not raise held-out accuracy here
yet: the issue's goal (+15 points from the start of RL to the end) is not met. Learning rate:
at 1e-4 accuracy falls (0.08 -> 0.02-0.04, KL to pi_0 ~1); at 3e-4 student and teacher drift
together to max-length outputs (KL to pi_0 ~4, divergence -> 0, reward 0 from step 15);
at 3e-5 (the default here) the policy stays near pi_0 (KL ~0.4 after 20 steps) and held-out
accuracy stays flat within noise (0.08 -> 0.09 -> 0.06): the stable range is <= 3e-5, and inside
it 20 steps do not move accuracy. A stronger reference KL (beta 5e-2) does not stop the 1e-4 drift.

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
    c.optimizer.learning_rate = 3e-5  # stable; 1e-4 drifts (accuracy falls), 3e-4 collapses to max-length outputs
    c.mesh.shape = (1, -1, 1)
    c.train.steps = 20
    c.train.micro_batch = 32
    c.train.sft_warmup_steps = 100
    c.train.checkpoint_every = 10
    c.train.eval_samples = 4
    c.train.eval_every = 10
    return c
