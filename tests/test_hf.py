"""models/hf.py export and config checks: what `save_model` writes loads in transformers with the
reference's logits (tied head, an index over several files, a mesh-sharded model, a re-save into
the same directory), and configs the port does not implement are refused by name."""
import json
import os

import numpy as np
import pytest
import transformers
from safetensors import safe_open

from hsd_jax import sharding
from models import hf
from tests.hf_reference import TINY, make_checkpoint, torch_logits

TOKENS = np.random.default_rng(3).integers(0, TINY["vocab_size"], (2, 9))
SMALL_SHARD = 20_000  # bytes: TINY's tensors are 0.2-19 KB, so this splits them over many files


def transformers_logits(path):
    """Logits [2, 9, V] of TOKENS from the directory as transformers loads it."""
    return torch_logits(transformers.Qwen3ForCausalLM.from_pretrained(path).float().eval(), TOKENS)


def tensor_files(path) -> dict[str, list[str]]:
    """safetensors file name -> names of the tensors it holds, read from the files themselves."""
    files = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                files[name] = list(f.keys())
    return files


@pytest.mark.parametrize(
    "tied,mesh_shape,max_shard_bytes",
    [(True, None, hf.MAX_SHARD_BYTES), (False, None, hf.MAX_SHARD_BYTES), (False, None, SMALL_SHARD),
     (False, (1, 4, 2), hf.MAX_SHARD_BYTES), (True, (2, 2, 2), SMALL_SHARD)],
    ids=["tied", "untied", "index", "mesh", "tied-mesh-index"],
)
def test_saved_model_loads_in_transformers(tmp_path, tied, mesh_shape, max_shard_bytes):
    reference = make_checkpoint(tmp_path / "src", tie_word_embeddings=tied)
    mesh = sharding.make_mesh(mesh_shape) if mesh_shape else None
    model = hf.load_model(tmp_path / "src", mesh=mesh)
    hf.save_model(model, tmp_path / "out", max_shard_bytes=max_shard_bytes)

    np.testing.assert_allclose(transformers_logits(tmp_path / "out"), torch_logits(reference, TOKENS),
                               atol=1e-6, rtol=0)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is tied
    files = tensor_files(tmp_path / "out")
    names = [name for held in files.values() for name in held]
    assert len(names) == len(set(names)) == len(reference.state_dict()) - tied  # no lm_head if tied
    assert ("lm_head.weight" in names) is not tied
    if max_shard_bytes == hf.MAX_SHARD_BYTES:
        assert list(files) == ["model.safetensors"]
        assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")


def test_index_maps_every_tensor_to_its_file_within_the_size_limit(tmp_path):
    make_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    hf.save_model(hf.load_model(tmp_path / "src"), tmp_path / "out", max_shard_bytes=SMALL_SHARD)
    files = tensor_files(tmp_path / "out")
    with open(tmp_path / "out" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert len(files) > 2 and "model.safetensors" not in files
    assert list(files) == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index["weight_map"] == {name: file for file, held in files.items() for name in held}
    total = 0
    for file, held in files.items():
        with safe_open(os.path.join(tmp_path, "out", file), framework="numpy") as f:
            sizes = [f.get_tensor(name).nbytes for name in held]
        assert sum(sizes) <= SMALL_SHARD or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total


def test_saving_again_replaces_the_earlier_weight_files(tmp_path):
    make_checkpoint(tmp_path / "a", seed=0)
    reference = make_checkpoint(tmp_path / "b", seed=1)
    hf.save_model(hf.load_model(tmp_path / "a"), tmp_path / "out", max_shard_bytes=SMALL_SHARD)
    hf.save_model(hf.load_model(tmp_path / "b"), tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    expected = torch_logits(reference, TOKENS)
    np.testing.assert_allclose(transformers_logits(tmp_path / "out"), expected, atol=1e-6, rtol=0)
    reloaded = hf.load_model(tmp_path / "out")
    hidden, _ = reloaded(TOKENS, np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape))
    np.testing.assert_allclose(np.asarray(reloaded.logits(hidden)), expected, atol=1e-4, rtol=0)


def test_bad_shard_size_is_a_clear_error(tmp_path):
    make_checkpoint(tmp_path / "src")
    with pytest.raises(ValueError, match="max_shard_bytes"):
        hf.save_model(hf.load_model(tmp_path / "src"), tmp_path / "out", max_shard_bytes=0)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(attention_bias=True), "attention_bias"),
     (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
     (dict(rope_scaling=YARN), "RoPE scaling")],
    ids=["attention-bias", "sliding-window", "rope-scaling"],
)
def test_unsupported_config_is_refused_by_name(tmp_path, overrides, match):
    transformers.Qwen3Config(**{**TINY, **overrides}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        hf.load_model(tmp_path)


def test_rope_scaling_in_the_transformers_4_layout_is_refused(tmp_path):
    """Hub configs saved by transformers 4 keep `rope_scaling` and `rope_theta` at the top level."""
    config = {**TINY, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "rope_scaling": YARN}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="RoPE scaling"):
        hf.load_model(tmp_path)
