"""The paper's recipe for Qwen3-8B (PAPER.md): G=8, 128 questions/step, 4096-token responses.

    python main.py --config configs/qwen3_8b.py --config.model.path=/models/Qwen3-8B \
        --config.data.train_files=/data/math_train.jsonl
"""

import ml_collections

from configs.base import base_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.workdir = "runs/qwen3_8b_" + (variant or "hsd")
    c.model.preset = "8b"
    c.mesh.shape = (1, -1, 1)  # FSDP over all devices
    # 128 rollouts per sampler call: the KV cache (11 GiB) and a bfloat16 decode copy of the
    # weights fit 80 GiB devices with headroom (main.py --dry_run; benchmarks/RESULTS.md)
    c.sampling.rows_per_call = 128
    return c
