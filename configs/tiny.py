"""The embedded default: a tiny random Qwen3 on the toy arrow-walk task, on CPU, in minutes.

No downloads: the tokenizer and the data are generated into the workdir. The task
(`hsd_jax.data.toy_problem`): "Follow 4 arrows from 2: 1>3 2>4 3>6 4>5 5>2 6>1.", solved one
arrow per line ("2>4", "4>5", ...) and boxed: lookups, no arithmetic (a 2-layer model does not
learn mod-10 sums in a CPU warm-up), and a failed walk leaves a successful one at its first wrong
symbol, where HSD's credit should land. 2000 training walks; the 64 held-out walks (`toy_split`)
never share a question with them. A 400-step supervised warm-up learns the walks in the
student's format, with slips (`data.toy_slip_rate`: a wrong symbol on a line with probability
0.25), and in the teacher's two formats (`warmup.warmup_batch`); then HSD runs as on a pod, with
held-out avg@4 logged at step 0 (the warmed-up pi_0) and every 10 steps.

Measured (benchmarks/RESULTS.md, "Tiny default"; seed 0, 2-core CPU): pi_0 = 0.26 held-out, at
the coverage formula's p* for G = 8; the whole run takes 8 minutes. From that warm-up, GRPO
(`configs/tiny.py:grpo`, lr 1e-4) raises held-out accuracy to 0.44 in 40 steps, but HSD lowers it
(0.14 after 10 steps at lr 5e-5, the default here; 1e-4 and 2e-4 fall further and end in
max-length outputs). The cause, read off the logits: at the divergence the teacher names the
peer's symbol, as it should, but after it the teacher goes on copying the peer's lines by
position instead of walking on from the student's symbol, so most of the distilled credit
teaches lookups that are wrong for the student's state. The issue's goal (HSD +15 points) is not
met.

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
    c.data.toy_slip_rate = 0.25
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
    c.optimizer.learning_rate = 5e-5  # HSD: 1e-4 and 2e-4 end in max-length outputs (RESULTS "Tiny default")
    c.mesh.shape = (1, -1, 1)
    c.train.steps = 40
    c.train.micro_batch = 32
    c.train.sft_warmup_steps = 400
    c.train.checkpoint_every = 10
    c.train.eval_samples = 4
    c.train.eval_every = 10
    return c
