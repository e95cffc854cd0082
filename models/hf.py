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
from functools import partial
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


def hf_entries(model: Qwen3) -> list[tuple[str, jax.Array, int | None, int]]:
    """(HF tensor name, port array, layer index or None, in_axes) of every HF tensor, in order
    (stacked layer parameters give one entry per layer)."""
    _, state = nnx.split(model)
    entries = []
    for key_path, variable in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]:
        path = _path_name(key_path)
        hf_name, in_axes = HF_NAMES[path]
        value = variable[...]
        layers = range(value.shape[0]) if path.startswith("layers.") else [None]
        entries += [(hf_name.format(layer) if layer is not None else hf_name, value, layer, in_axes) for layer in layers]
    return entries


@partial(jax.jit, static_argnums=(2,))
def _layer_slice(value: jax.Array, layer: jax.Array, dtype) -> jax.Array:
    return value[layer].astype(dtype)


def host_tensor(value: jax.Array, layer: int | None, in_axes: int, dtype=None) -> np.ndarray:
    """One HF tensor in host memory, in HF layout and `dtype` (default the array's): layer
    `layer` of a stacked parameter (sliced on device) or the whole array, gathered from every
    process (all processes must call this, in the same order)."""
    dtype = jnp.dtype(dtype or value.dtype)
    if layer is not None:
        value = _layer_slice(value, jnp.asarray(layer, jnp.int32), dtype)
    value = value.astype(dtype)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        host = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    else:
        host = np.asarray(jax.device_get(value))
    return np.ascontiguousarray(to_hf_tensor(host, in_axes))


def hf_tensors(model: Qwen3) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named host arrays (layers unstacked)."""
    return {name: host_tensor(value, layer, in_axes) for name, value, layer, in_axes in hf_entries(model)}


def split_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Groups tensor names, in order, into shards of at most `max_shard_bytes` by their byte
    sizes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _remove_weight_files(path: str) -> None:
    """Deletes HF weight files of an earlier save (`model.safetensors`, its index and
    `model-*-of-*.safetensors`), so that no loader can pick up stale tensors."""
    for name in os.listdir(path):
        if name in ("model.safetensors", "model.safetensors.index.json") or (
            name.startswith("model-") and "-of-" in name and name.endswith(".safetensors")
        ):
            os.remove(os.path.join(path, name))


def save_model(model: Qwen3, path: str | os.PathLike, max_shard_bytes: int = MAX_SHARD_BYTES, dtype: str | None = None) -> None:
    """Writes config.json and safetensors weights that transformers loads: `model.safetensors`,
    or `model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json` when they pass
    `max_shard_bytes` (4 GiB by default), in `dtype` (e.g. "bfloat16"; default the params').
    Weight files of an earlier save in `path` are replaced. A tied head is not written
    (`tie_word_embeddings` in config.json).

    A mesh-sharded model is gathered one tensor (one layer of a stacked parameter) at a time and
    written one shard file at a time, so host memory holds at most one shard. Multi-process: every
    process calls this (each tensor is gathered collectively); only process 0 writes.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    path = os.fspath(path)
    writer = jax.process_index() == 0
    hf_config = model.config.to_hf()
    dtype = jnp.dtype(dtype or hf_config["torch_dtype"])
    entries = {name: (value, layer, in_axes) for name, value, layer, in_axes in hf_entries(model)}
    sizes = {name: int(np.prod(value.shape[layer is not None:])) * dtype.itemsize for name, (value, layer, _) in entries.items()}
    shards = split_shards(sizes, max_shard_bytes)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if writer:
        os.makedirs(path, exist_ok=True)
        _remove_weight_files(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({**hf_config, "torch_dtype": dtype.name}, f, indent=2)
    for file, names in zip(files, shards):
        tensors = {name: host_tensor(*entries[name], dtype=dtype) for name in names}
        if writer:
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        del tensors
    if writer and len(shards) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)


def load_tokenizer(path: str | os.PathLike):
    """A `transformers` tokenizer from a local directory (never the network)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"No tokenizer directory at {path}: expected a local HF tokenizer (tokenizer.json).")
    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
