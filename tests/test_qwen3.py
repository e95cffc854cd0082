"""Qwen3 port vs transformers' PyTorch Qwen3ForCausalLM, the KV cache and packing (export: test_hf.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import hf, qwen3
from tests.hf_reference import TINY, make_checkpoint, torch_logits


def forward_logits(model, tokens, segment_ids=None, positions=None):
    tokens = jnp.asarray(tokens)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = model(tokens, positions, segment_ids)
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
        dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2),
        dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6),
    ],
    ids=["tied-gqa1", "untied-gqa2", "untied-gqa4-theta1e6"],
)
def test_logits_match_transformers(tmp_path, overrides):
    reference = make_checkpoint(tmp_path, **overrides)
    model = hf.load_model(tmp_path)
    assert model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 19))
    np.testing.assert_allclose(forward_logits(model, tokens), torch_logits(reference, tokens), atol=1e-4, rtol=0)


def test_cached_decoding_equals_full_forward(tmp_path):
    make_checkpoint(tmp_path)
    model = hf.load_model(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 12)))
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    full, _ = model(tokens, positions)

    cache = qwen3.KVCache.init(model.config, batch=2, max_len=16)
    prefill, cache = model(tokens[:, :5], positions[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 12):
        hidden, cache = model(tokens[:, t : t + 1], positions[:, t : t + 1], cache=cache)
        steps.append(hidden)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache.index) == 12


def test_packed_segments_equal_separate_sequences(tmp_path):
    make_checkpoint(tmp_path)
    model = hf.load_model(tmp_path)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, TINY["vocab_size"], 7), rng.integers(0, TINY["vocab_size"], 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    logits = forward_logits(model, packed, jnp.asarray(segments), jnp.asarray(positions))
    np.testing.assert_allclose(logits[0, :7], forward_logits(model, a[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[0, 7:12], forward_logits(model, b[None])[0], atol=1e-5, rtol=0)


def test_bfloat16_compute_stays_close(tmp_path):
    """bf16 params and compute vs float32 torch: measured error ~1-1.5 bf16 eps of the largest
    logit (0.003-0.005 here); 3 eps (~0.011) still catches a wrong rope_theta (moves 0.035-0.09)
    or a missing q_norm (0.02)."""
    reference = make_checkpoint(tmp_path)
    model = hf.load_model(tmp_path, param_dtype="bfloat16", dtype="bfloat16")
    tokens = np.random.default_rng(4).integers(0, TINY["vocab_size"], (1, 11))
    expected = torch_logits(reference, tokens)
    atol = 3 * float(jnp.finfo(jnp.bfloat16).eps) * np.abs(expected).max()
    np.testing.assert_allclose(forward_logits(model, tokens), expected, atol=atol, rtol=0)


def test_remat_gives_same_gradients(tmp_path):
    make_checkpoint(tmp_path)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, TINY["vocab_size"], (2, 8)))
    positions = jnp.broadcast_to(jnp.arange(8), tokens.shape)

    def grads(remat):
        from flax import nnx

        graphdef, state = nnx.split(hf.load_model(tmp_path, remat=remat))

        def loss(state):
            model = nnx.merge(graphdef, state)
            hidden, _ = model(tokens, positions)
            return jnp.mean(model.logits(hidden) ** 2)

        return jax.tree.leaves(jax.grad(loss)(state))

    for plain, rematted in zip(grads("none"), grads("full")):
        np.testing.assert_allclose(plain, rematted, atol=1e-6)


@pytest.mark.parametrize("name,expected", [("8b", 8.19e9), ("32b", 32.8e9)])
def test_preset_parameter_counts(name, expected):
    assert qwen3.count_params(qwen3.Qwen3Config.preset(name)) == pytest.approx(expected, rel=0.005)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_model(tmp_path)
    make_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\..* has shape"):
        hf.load_model(tmp_path, head_dim=8)
    with pytest.raises(ValueError, match="Unsupported architecture"):
        qwen3.Qwen3Config.from_hf({**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    reference = make_checkpoint(tmp_path / "f32").to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "bf16")
    model = hf.load_model(tmp_path / "bf16", param_dtype="bfloat16")
    expected = reference.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [N*H, D]
    loaded = np.asarray(model.layers.q_proj[...][1].astype(jnp.float32))  # [D, N, H]
    np.testing.assert_array_equal(loaded.reshape(loaded.shape[0], -1).T, expected)
