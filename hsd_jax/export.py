"""A policy as a Hugging Face model directory: what transformers, vLLM or SGLang load.

    <dir>/config.json, model.safetensors (or model-0000i-of-0000n.safetensors + index),
          generation_config.json (the run's sampler settings), tokenizer files

Weights go through `models.hf.save_model`: gathered one tensor at a time and written one shard
file at a time by process 0; every process must call `export_policy`.
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from hsd_jax import sampling
from hsd_jax._models import hf


def generation_config(sampling_cfg: sampling.SamplingConfig, tokenizer) -> dict:
    """generation_config.json: the run's sampling settings and special tokens (top_k 0 = off)."""
    return {
        "do_sample": sampling_cfg.temperature > 0,
        "temperature": sampling_cfg.temperature,
        "top_p": sampling_cfg.top_p,
        "top_k": sampling_cfg.top_k,
        "eos_token_id": list(sampling_cfg.eos_ids),
        "pad_token_id": sampling_cfg.pad_id,
        **({"bos_token_id": tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else {}),
    }


def export_policy(graphdef: nnx.GraphDef, params: nnx.State, tokenizer, sampling_cfg: sampling.SamplingConfig,
                  directory: str, dtype: str = "bfloat16", max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> str:
    """Writes the policy `(graphdef, params)` (any sharding) to `directory` as above, weights in
    `dtype`; returns the directory's absolute path."""
    directory = os.path.abspath(directory)
    hf.save_model(nnx.merge(graphdef, params), directory, max_shard_bytes=max_shard_bytes, dtype=dtype)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "generation_config.json"), "w") as f:
            json.dump(generation_config(sampling_cfg, tokenizer), f, indent=2)
        tokenizer.save_pretrained(directory)
    return directory
