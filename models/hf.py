"""Hugging Face checkpoint directories <-> Qwen3 params, and local tokenizers.

A declarative table maps each parameter of `models.qwen3.Qwen3` to its HF tensor name. HF stores
linear weights as [out, in]; the port stores them input-first with heads split out
([D, N, H], [N, H, D], [D, F], ...), so those tensors are transposed and reshaped on the way.
Stacked layer parameters gather `model.layers.{i}.*` over i.

With a mesh, every array is built by `jax.make_array_from_callback`: each device's shard reads
only the layers it holds from the memory-mapped safetensors files, so a 32B checkpoint never sits
whole on one device or in host memory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from .qwen3 import DTYPES, Qwen3, Qwen3Config, abstract_model

# port parameter path -> (HF tensor name, how many leading port axes form HF's "in" axis).
# HF stores a linear weight as [out, in]; the port as [in..., out...] (e.g. q_proj [D, N, H],
# o_proj [N, H, D]). 0 means the tensor is stored as is (embeddings, norms).
HF_NAMES: dict[str, tuple[str, int]] = {
    "embed": ("model.embed_tokens.weight", 0),
    "final_norm": ("model.norm.weight", 0),
    "lm_head": ("lm_head.weight", 1),
    "layers.attn_norm": ("model.layers.{}.input_layernorm.weight", 0),
    "layers.q_proj": ("model.layers.{}.self_attn.q_proj.weight", 1),
    "layers.k_proj": ("model.layers.{}.self_attn.k_proj.weight", 1),
    "layers.v_proj": ("model.layers.{}.self_attn.v_proj.weight", 1),
    "layers.q_norm": ("model.layers.{}.self_attn.q_norm.weight", 0),
    "layers.k_norm": ("model.layers.{}.self_attn.k_norm.weight", 0),
    "layers.o_proj": ("model.layers.{}.self_attn.o_proj.weight", 2),
    "layers.mlp_norm": ("model.layers.{}.post_attention_layernorm.weight", 0),
    "layers.gate_proj": ("model.layers.{}.mlp.gate_proj.weight", 1),
    "layers.up_proj": ("model.layers.{}.mlp.up_proj.weight", 1),
    "layers.down_proj": ("model.layers.{}.mlp.down_proj.weight", 1),
}
MAX_SHARD_BYTES = 4 * 1024**3


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def hf_shape(shape: tuple[int, ...], in_axes: int) -> tuple[int, ...]:
    """HF's shape for a port parameter of `shape`: [out, in] for linear weights."""
    if not in_axes:
        return tuple(shape)
    return (int(np.prod(shape[in_axes:])), int(np.prod(shape[:in_axes])))


def to_hf_tensor(value: np.ndarray, in_axes: int) -> np.ndarray:
    """Port layout [in..., out...] -> HF layout [out, in]."""
    return value.reshape(hf_shape(value.shape, in_axes)[::-1]).T if in_axes else value


def from_hf_tensor(tensor: np.ndarray, shape: tuple[int, ...], in_axes: int, name: str) -> np.ndarray:
    """HF layout -> port layout of `shape`, checking sizes (the error names the tensor)."""
    expected = hf_shape(shape, in_axes)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected} from config.json.")
    return tensor.T.reshape(shape) if in_axes else tensor


class SafetensorsDir:
    """Lazy, memory-mapped access to the tensors of a HF checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.file_of = json.load(f)["weight_map"]
        elif os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                self.file_of = {name: "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"No weights in {self.path}: expected model.safetensors or model.safetensors.index.json "
                "(a Hugging Face checkpoint directory saved with safetensors)."
            )
        self._handles: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> np.ndarray:
        if name not in self.file_of:
            raise KeyError(f"tensor {name} is missing from the checkpoint in {self.path}.")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._handles[file].get_tensor(name)


def _param_loader(weights: SafetensorsDir, path: str, shape: tuple[int, ...], dtype) -> Any:
    """A function index -> np.ndarray that reads the slice `index` of parameter `path`."""
    hf_name, in_axes = HF_NAMES[path]

    def read_layer(layer: int | None) -> np.ndarray:
        name = hf_name.format(layer)
        target = shape[1:] if layer is not None else shape
        return from_hf_tensor(weights.get(name), target, in_axes, name).astype(dtype)

    def load(index: tuple[slice, ...]) -> np.ndarray:
        if not path.startswith("layers."):
            return read_layer(None)[index]
        layers = range(shape[0])[index[0]]
        return np.stack([read_layer(layer)[index[1:]] for layer in layers])

    return load


def load_model(
    path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, rules: dict | None = None, **config_overrides
) -> Qwen3:
    """Loads a local HF Qwen3 directory (config.json + safetensors) into a `Qwen3`.

    config_overrides set `Qwen3Config` fields such as param_dtype="bfloat16", dtype="bfloat16",
    remat="full". With `mesh`, each parameter is created directly in its sharding.
    """
    from hsd_jax import sharding  # models/ stays importable without the library around it

    config = Qwen3Config.from_hf(path, **config_overrides)
    weights = SafetensorsDir(path)
    dtype = DTYPES[config.param_dtype]
    graphdef, state = nnx.split(abstract_model(config))

    def load_variable(key_path, variable):
        name = _path_name(key_path)
        shape = tuple(variable.shape)
        load = _param_loader(weights, name, shape, dtype)
        if mesh is None:
            value = jnp.asarray(load(tuple(slice(None) for _ in shape)))
        else:
            target = sharding.named_sharding(shape, variable.logical_axes, mesh, rules)
            value = jax.make_array_from_callback(shape, target, load)
        return variable.replace(value)

    state = jax.tree_util.tree_map_with_path(load_variable, state, is_leaf=_is_variable)
    return nnx.merge(graphdef, state)


def hf_tensors(model: Qwen3) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named host arrays (layers unstacked)."""
    _, state = nnx.split(model)
    tensors = {}
    for key_path, variable in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]:
        path = _path_name(key_path)
        hf_name, in_axes = HF_NAMES[path]
        value = np.asarray(jax.device_get(variable[...]))
        if path.startswith("layers."):
            for layer, layer_value in enumerate(value):
                tensors[hf_name.format(layer)] = np.ascontiguousarray(to_hf_tensor(layer_value, in_axes))
        else:
            tensors[hf_name] = np.ascontiguousarray(to_hf_tensor(value, in_axes))
    return tensors


def split_shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Groups tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own)."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.nbytes
    return shards + [current]


def _remove_weight_files(path: str) -> None:
    """Deletes HF weight files of an earlier save (`model.safetensors`, its index and
    `model-*-of-*.safetensors`), so that no loader can pick up stale tensors."""
    for name in os.listdir(path):
        if name in ("model.safetensors", "model.safetensors.index.json") or (
            name.startswith("model-") and "-of-" in name and name.endswith(".safetensors")
        ):
            os.remove(os.path.join(path, name))


def save_model(model: Qwen3, path: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Writes config.json and safetensors weights that transformers loads: `model.safetensors`,
    or `model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json` when they pass
    `max_shard_bytes` (4 GiB by default). Weight files of an earlier save in `path` are replaced.
    A tied head is not written (`tie_word_embeddings` in config.json). A mesh-sharded model is
    gathered into host memory (single host only)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _remove_weight_files(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_hf(), f, indent=2)
    tensors = hf_tensors(model)
    shards = split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer from a local directory (never the network)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"No tokenizer directory at {path}: expected a local HF tokenizer (tokenizer.json).")
    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
