"""The dry run (`memory_plan.report`) of a 2-layer Qwen3-8B on the 8 simulated test devices."""

import json

import jax
import ml_collections

from configs import qwen3_8b
from hsd_jax import memory_plan, validation

# Qwen3-8B's published architecture (HF config.json), two of its 36 layers.
V, D, N, K, H, F, L = 151936, 4096, 32, 8, 128, 12288, 2


def two_layer_8b(directory) -> ml_collections.ConfigDict:
    """configs/qwen3_8b.py on a checkpoint directory holding only a config.json of 2 layers
    (the dry run reads no weight), with shorter rows."""
    hf_config = dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=V, hidden_size=D,
        num_attention_heads=N, num_key_value_heads=K, head_dim=H, intermediate_size=F, num_hidden_layers=L,
        tie_word_embeddings=False, rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
    )
    (directory / "config.json").write_text(json.dumps(hf_config))
    config = validation.resolve(qwen3_8b.get_config())
    config.model.path = str(directory)
    config.model.preset = ""
    config.data.questions_per_step = 16
    config.data.max_prompt_len = 256
    config.sampling.max_new_tokens = 512
    config.sampling.rows_per_call = 64
    config.hindsight.max_teacher_len = 1536
    return config


def test_dry_run_counts_sharded_params_and_cache_and_allocates_nothing(tmp_path):
    config = two_layer_8b(tmp_path)
    assert tuple(config.mesh.shape) == (1, -1, 1) and len(jax.devices()) == 8  # FSDP over 8 devices
    before = {id(x) for x in jax.live_arrays()}
    printed = []
    result = memory_plan.report(config, device_memory_gib=80.0, print_fn=printed.append)

    # FSDP splits every matrix's model dim D over 8 devices; norms stay whole. float32 weights.
    split = 2 * V * D + L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F)
    whole = D + L * (2 * D + 2 * H)
    assert result["bytes"]["params"] == 4 * (split // 8 + whole)
    assert result["bytes"]["reference_params"] == result["bytes"]["params"]  # the recipe's beta > 0

    # 64 rows per sampler call (8 prompts x G=8) split over 8 devices; 256-token prompt bucket
    # + 512 new tokens - 1 slots; bfloat16 keys and values, int32 segment ids and write index.
    rows, slots = 64 // 8, 256 + 512 - 1
    assert result["bytes"]["kv_cache"] == 2 * L * rows * slots * K * H * 2 + rows * slots * 4 + 4

    b = result["bytes"]
    assert b["peak"] == max(b["update_phase"], b["sampling_phase"]) > b["params"] + b["optimizer_state"]
    assert result["compile_seconds"]["update"] > 0 and result["compile_seconds"]["sampler"] > 0
    assert "estimate" in printed[0] and "headroom" in printed[0]  # the table says what CPU numbers are

    smallest_weight = 4 * D * K * H // 8  # one layer's k_proj shard: no weight was created
    created = [x for x in jax.live_arrays() if id(x) not in before]
    assert all(x.nbytes < smallest_weight for x in created), [(x.shape, x.dtype) for x in created]
