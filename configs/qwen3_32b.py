"""The paper's recipe for Qwen3-32B on a pod: FSDP within hosts, tensor parallel over 4 chips.

    python main.py --config configs/qwen3_32b.py --config.model.path=/models/Qwen3-32B \
        --config.data.train_files=/data/math_train.jsonl
"""

import ml_collections

from configs.base import base_config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = base_config(variant)
    c.workdir = "runs/qwen3_32b_" + (variant or "hsd")
    c.model.preset = "32b"
    c.mesh.shape = (1, -1, 4)
    c.train.micro_batch = 4
    return c
