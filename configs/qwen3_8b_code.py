"""The paper's code recipe for Qwen3-8B: the qwen3_8b recipe with 8192-token responses (PAPER.md).

    python main.py --config configs/qwen3_8b_code.py --config.model.path=/models/Qwen3-8B \
        --config.data.train_files=/data/code_train.jsonl
    # the paper's 4:1 math:code mixture (unprefixed files hold code rows here)
    python main.py --config configs/qwen3_8b_code.py --config.model.path=/models/Qwen3-8B \
        --config.data.mixture=math:4,code:1 \
        --config.data.train_files=math=/data/math_train.jsonl,/data/code_train.jsonl

HSD's reference a* for a code row is its unit tests as text, at most `hindsight.max_tests_tokens`.
"""

import ml_collections

from configs import qwen3_8b


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = qwen3_8b.get_config(variant)
    c.workdir = "runs/qwen3_8b_code_" + (variant or "hsd")
    c.data.kind = "code"
    c.sampling.max_new_tokens = 8192  # loss.max_response_length follows
    c.hindsight.max_tests_tokens = 1024
    # question + tests + a peer's demonstration + the rollout + template text
    c.hindsight.max_teacher_len = 1024 + 1024 + 8192 + 8192 + 512
    # student rows up to 9216 tokens pad to 12288, teacher rows up to 18944 to 20480
    c.hindsight.buckets = (256, 512, 1024, 2048, 4096, 8192, 12288, 16384, 20480)
    # twice the qwen3_8b cache slots per rollout: half the rollouts per sampler call keep the KV
    # cache at its size, and half the rows per micro-batch keep the update's activations near theirs
    c.sampling.rows_per_call = 64
    c.train.micro_batch = 4
    return c
