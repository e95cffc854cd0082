"""The continuous-batching sampler vs the static one (same key: same rows, tokens, logprobs,
lengths, truncation), and decode-slot utilisation of a hand-counted schedule."""
import jax
import numpy as np
import pytest
from flax import nnx

from hsd_jax import sampling, sharding
from models import qwen3

PROMPTS = [[3, 17, 4], [9, 1, 5, 60, 2, 44, 8, 13, 71, 30, 6], [88, 21, 5, 5, 40, 12, 7], [5], [6, 7]]
SETTINGS = dict(prompt_buckets=(8, 16), pad_id=0)


@pytest.fixture(scope="module")
def split_model():
    config = qwen3.Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=256)
    graphdef, _ = nnx.split(qwen3.abstract_model(config))
    return graphdef, jax.jit(lambda: nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(0)))[1])()  # one compile


@pytest.mark.parametrize(
    "settings, forced, refill_at",
    [(dict(temperature=0.0, eos_ids=(96,)), [2, 9, 1, 12, 4, 7, 3, 14, 5, 1, 6, 30, 2, 8, 11], 1),
     (dict(temperature=0.8, top_k=20, eos_ids=(3, 5, 8, 11, 13, 17)), None, 2)],
    ids=["greedy-forced-eos", "sampled-natural-eos-refill-in-pairs"],
)
def test_continuous_equals_static(split_model, settings, forced, refill_at):
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=12, n=3, **settings, **SETTINGS)
    key = jax.random.key(1)
    static = jax.device_get(sampling.generate(graphdef, params, PROMPTS, key, config, forced_lengths=forced))
    lengths = static.lengths
    assert len(set(lengths.tolist())) >= 4 and static.truncated.any() and not static.truncated.all()
    out, stats = sampling.generate_continuous(graphdef, params, PROMPTS, key, config, slots=2, steps_per_call=3,
                                              read_buckets=2, refill_at=refill_at, forced_lengths=forced)
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens, static.tokens)
    np.testing.assert_allclose(out.logprobs, static.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.truncated, static.truncated)
    np.testing.assert_array_equal(out.prompt_index, np.arange(15) // 3)
    if forced is not None:  # the forcing itself, checked by hand: EOS at the forced length, else the limit
        np.testing.assert_array_equal(lengths, np.minimum(forced, 12))
    assert stats.slots == 2 and stats.useful_tokens == int((lengths - 1).sum())
    # every step has a busy slot, so ceil(useful / slots) <= steps <= useful
    assert -(-stats.useful_tokens // 2) <= stats.decode_steps <= stats.useful_tokens


@pytest.mark.parametrize("steps_per_call", [1, 3])
@pytest.mark.parametrize("refill_at, decode_steps", [(1, 4), (2, 5)])
def test_utilisation_of_a_hand_counted_schedule(split_model, steps_per_call, refill_at, decode_steps):
    """Rows of lengths 3, 1, 2, 4 on 2 slots, useful tokens 2 + 0 + 1 + 3 = 6 either way.
    refill_at 1: r0, r1 staged and placed; r1 ends at once, so the call returns before any step;
    r2, r3 staged, r2 takes r1's slot; step 1: r0, r2 (r2 ends; r3 takes its slot within the call);
    step 2: r0 (ends), r3; steps 3, 4: r3 alone. 4 steps.
    refill_at 2: r1's slot waits for a second free one; steps 1, 2: r0 alone (ends); r2, r3 refill;
    step 3: r2 (ends), r3; steps 4, 5: r3 alone. 5 steps."""
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=8, temperature=0.0, eos_ids=(96,), **SETTINGS)
    prompts, forced = [[1, 2], [3], [4, 5, 6], [7]], [3, 1, 2, 4]
    out, stats = sampling.generate_continuous(graphdef, params, prompts, jax.random.key(0), config, slots=2,
                                              steps_per_call=steps_per_call, read_buckets=1, refill_at=refill_at,
                                              forced_lengths=forced)
    np.testing.assert_array_equal(out.lengths, forced)
    assert stats == sampling.DecodeStats(slots=2, decode_steps=decode_steps, useful_tokens=6)
    assert stats.utilisation == 6 / (2 * decode_steps)
    # the static engine runs all 4 rows until the longest ends: 3 decode steps of 4 slots
    assert sampling.static_stats(out) == sampling.DecodeStats(slots=4, decode_steps=3, useful_tokens=6)
    assert sampling.static_stats(out).utilisation == 0.5


def test_sharded_equals_static(split_model):
    """On a (2, 2, 2) mesh of the 8 CPU devices (slots over data x fsdp, heads over tensor), the
    continuous engine, refilling slots inside its decode loop, draws the static engine's rows."""
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=10, n=2, temperature=0.8, top_p=0.9,
                                     eos_ids=(3, 5, 8, 11, 13, 17), **SETTINGS)
    key = jax.random.key(2)
    static = jax.device_get(sampling.generate(graphdef, params, PROMPTS, key, config))
    assert len(set(static.lengths.tolist())) >= 3
    mesh = sharding.make_mesh((2, 2, 2))
    out, stats = sampling.generate_continuous(graphdef, sampling.sampling_params(params, mesh), PROMPTS, key, config,
                                              slots=4, steps_per_call=3, mesh=mesh)
    assert len(out.tokens.sharding.device_set) == 8
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens, static.tokens)
    np.testing.assert_allclose(out.logprobs, static.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.lengths, static.lengths)
    assert stats.useful_tokens == int((static.lengths - 1).sum())
