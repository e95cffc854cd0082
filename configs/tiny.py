"""The embedded default: a tiny random Qwen3 on the toy arithmetic task, on CPU, in minutes.

No downloads: the tokenizer and the data are generated into the workdir. A short supervised
warm-up on the worked solutions brings the success rate off zero so that HSD has peers to learn
from; then the RL loop runs as on a pod.

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
    c.hindsight.buckets = (64, 128, 192)
    # A compact teacher context: the toy tokenizer spells most text character by character.
    c.hindsight.template = ml_collections.ConfigDict(
        dict(answer_open="\nAnswer: ", answer_close="", demo_open="\nSolution:\n", demo_close="", context_close="")
    )
    c.optimizer.learning_rate = 1e-5  # at 1e-4 self-distillation drifts: KL to pi_0 > 4, max-length outputs
    c.mesh.shape = (1, -1, 1)
    c.train.steps = 20
    c.train.micro_batch = 32
    c.train.sft_warmup_steps = 300
    c.train.checkpoint_every = 10
    c.train.eval_samples = 4
    c.train.eval_every = 10
    return c
