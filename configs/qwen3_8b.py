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
    return c
