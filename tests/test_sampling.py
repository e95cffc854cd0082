"""The jitted sampler vs transformers' greedy generate, a teacher-forced forward + NumPy truncation,
exact draw frequencies, EOS handling, sharding, bucketing and input checks."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from hsd_jax import sampling, sharding
from models import hf
from tests.hf_reference import TINY, make_checkpoint

V = TINY["vocab_size"]
PROMPTS = [[3, 17, 4], [9, 1, 5, 60, 2, 44, 8, 13, 71, 30, 6], [88, 21, 5, 5, 40, 12, 7]]
BUCKETS = (8, 16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    return path, make_checkpoint(path)


@pytest.fixture(scope="module")
def split_model(checkpoint):
    return nnx.split(hf.load_model(checkpoint[0]))


@pytest.fixture(scope="module")
def sharp_model(checkpoint):
    """The tiny model with its final norm scaled up, so truncation removes real probability mass."""
    model = hf.load_model(checkpoint[0])
    model.final_norm[...] = model.final_norm[...] * 6.0
    return nnx.split(model)


def reference_distribution(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """HF's warpers in float64 NumPy: temperature -> top-k -> top-p -> min-p, renormalised. [V] -> [V]."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(p.shape, bool)
    keep[order[: top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    sorted_p = p[order]
    mass_before = np.cumsum(sorted_p) - sorted_p
    keep[order[mass_before >= top_p]] = False
    p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    keep &= p >= min_p * p.max()
    return np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward_logits(params, tokens, segments, graphdef):
    model = nnx.merge(graphdef, params)
    hidden, _ = model(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), segments)
    return model.logits(hidden)


def teacher_forced_logits(graphdef, params, sequences, length=32):
    """Full forward (no cache) of right-padded sequences, padding in segment 0 -> float32 [R, length, V]."""
    tokens = np.zeros((len(sequences), length), np.int32)
    segments = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)], segments[row, : len(sequence)] = sequence, 1
    return np.asarray(_forward_logits(params, tokens, segments, graphdef))


def chi_square_z(counts, probs):
    """Wilson-Hilferty z-score of Pearson's chi-square statistic (about N(0, 1) under the null)."""
    expected = probs * counts.sum()
    stat, dof = np.sum((counts - expected) ** 2 / expected), len(probs) - 1
    return ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A checkpoint whose LM head is the embedding (`sampling._logits`'s CPU path for B <= D / 16 rows)."""
    path = tmp_path_factory.mktemp("tied")
    return path, make_checkpoint(path, seed=1, tie_word_embeddings=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_matches_transformers(request, tied):
    checkpoint = request.getfixturevalue("tied_checkpoint" if tied else "checkpoint")
    graphdef, params = nnx.split(hf.load_model(checkpoint[0]))
    config = sampling.SamplingConfig(max_new_tokens=48, temperature=0.0, prompt_buckets=BUCKETS)
    out = sampling.generate(graphdef, params, PROMPTS, jax.random.key(0), config)
    reference = checkpoint[1]
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=48, min_new_tokens=48,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
            )[0, len(prompt):].numpy()
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), expected)
    np.testing.assert_array_equal(out.lengths, 48)
    assert np.all(np.asarray(out.truncated))


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=1.0, top_p=0.8, min_p=0.02), dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)],
    ids=["t1-full-vocab-topp-minp", "t0.7-topk-topp-minp"],
)
def test_logprobs_match_teacher_forced_forward(sharp_model, settings):
    graphdef, params = sharp_model
    config = sampling.SamplingConfig(max_new_tokens=12, n=2, prompt_buckets=BUCKETS, **settings)
    out = jax.device_get(sampling.generate(graphdef, params, PROMPTS, jax.random.key(1), config))
    prompts = [PROMPTS[i] for i in out.prompt_index]
    sequences = [np.concatenate([p, out.tokens[row, : out.lengths[row]]]) for row, p in enumerate(prompts)]
    logits = teacher_forced_logits(graphdef, params, sequences)
    for row, prompt in enumerate(prompts):
        for t, token in enumerate(out.tokens[row, : out.lengths[row]]):
            probs = reference_distribution(logits[row, len(prompt) - 1 + t], **settings)
            assert probs[token] > 0, f"row {row} step {t}: token {token} is outside the kept set"
            assert abs(out.logprobs[row, t] - np.log(probs[token])) <= 1e-5
    assert np.mean(out.logprobs < -1e-3) > 0.5  # the truncated distributions are not one-hot


@pytest.mark.parametrize(
    "settings",
    [dict(top_p=0.7), dict(top_k=6), dict(top_k=15, top_p=0.8), dict(top_p=0.95, min_p=0.05),
     dict(temperature=0.5, top_p=0.6)],
    ids=["topp", "topk", "topk-topp", "topp-minp", "t0.5-topp"],
)
def test_draws_stay_in_kept_set_with_exact_frequencies(settings):
    draws, vocab = 40_000, 64
    logits = np.random.default_rng(0).normal(0.0, 2.0, vocab).astype(np.float32)
    config = sampling.SamplingConfig(**{"temperature": 1.0, **settings})
    keys = jax.random.split(jax.random.key(2), draws)
    sample = jax.jit(lambda logits, keys: sampling.sample_tokens(logits, keys, config))
    tokens, logprobs = jax.device_get(sample(jnp.broadcast_to(logits, (draws, vocab)), keys))
    probs = reference_distribution(logits, config.temperature, config.top_k, config.top_p, config.min_p)
    kept = probs > 0
    assert 2 < kept.sum() < vocab
    assert kept[tokens].all(), "a token outside the kept set was drawn"
    np.testing.assert_allclose(logprobs, np.log(probs[tokens]), atol=1e-5, rtol=0)
    counts = np.bincount(tokens, minlength=vocab)[kept]
    assert abs(chi_square_z(counts, probs[kept])) < 4.0


def test_decode_logits_of_a_tied_head_are_the_model_logits(tied_checkpoint):
    """`sampling._logits` (CPU, tied head, 16 B <= D: the [V, B] product, then a product with the
    identity) gives `model.logits`, and the identity product is exact: the [V, B] product transposed."""
    model = hf.load_model(tied_checkpoint[0])
    hidden = jax.random.normal(jax.random.key(0), (TINY["hidden_size"] // 16, TINY["hidden_size"]))
    logits = np.asarray(jax.jit(lambda h: sampling._logits(model, h, 1))(hidden))
    by_vocab = np.asarray(jnp.einsum("vd,bd->vb", model.embed[...], hidden))
    np.testing.assert_array_equal(logits, by_vocab.T)
    np.testing.assert_allclose(logits, np.asarray(model.logits(hidden)), rtol=1e-6, atol=1e-6)


def test_full_vocab_top_p_threshold_is_exact():
    """The bisection picks HF's cut-off on a large flat vocabulary, a peaked one and exact ties."""
    rng = np.random.default_rng(3)
    rows = [rng.normal(0, 0.4, 20_000), rng.normal(0, 4.0, 20_000), np.round(rng.normal(0, 1, 20_000), 1)]
    for top_p in (0.3, 0.95):
        for x in rows:
            e = np.exp(x - x.max()).astype(np.float32)
            tau = float(sampling.top_p_threshold(jnp.asarray(e)[None], top_p)[0])
            s = np.sort(e.astype(np.float64))[::-1]
            mass_above = np.array([s[s > v].sum() for v in np.unique(s)])
            expected = np.unique(s)[mass_above < top_p * s.sum()].min()
            assert tau == pytest.approx(expected, rel=1e-6)


def test_eos_ends_rows_and_rows_stay_ended(split_model):
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=20, n=3, pad_id=0, prompt_buckets=BUCKETS)
    free = jax.device_get(sampling.generate(graphdef, params, PROMPTS, jax.random.key(4), config))
    eos = (int(free.tokens[0, 4]), int(free.tokens[1, 9]), int(free.tokens[5, 2]))
    ended = jax.device_get(
        sampling.generate(graphdef, params, PROMPTS, jax.random.key(4), dataclasses.replace(config, eos_ids=eos))
    )
    assert 0 < ended.truncated.sum() < len(ended.truncated) or not ended.truncated.any()
    for row in range(len(PROMPTS) * config.n):
        hits = np.flatnonzero(np.isin(free.tokens[row], eos))
        length = hits[0] + 1 if len(hits) else config.max_new_tokens
        assert ended.lengths[row] == length
        assert ended.truncated[row] == (len(hits) == 0)
        np.testing.assert_array_equal(ended.tokens[row, :length], free.tokens[row, :length])
        np.testing.assert_array_equal(ended.logprobs[row, :length], free.logprobs[row, :length])
        assert np.all(ended.tokens[row, length:] == 0) and np.all(ended.logprobs[row, length:] == 0)
    assert ended.lengths[0] <= 5 and ended.lengths[1] <= 10 and ended.lengths[5] <= 3


@pytest.mark.parametrize(
    "temperature, read_buckets", [(0.0, 7), (1.0, sampling.STATIC_READ_BUCKETS)], ids=["greedy-7", "sampled-default"]
)
def test_cache_prefix_segments_equal_whole_cache_reads(split_model, temperature, read_buckets):
    """Decode segments that read only a prefix of the cache give the tokens, logprobs and lengths of
    reading the whole cache every step (read_buckets=1), for rows ending at mixed steps (forced
    EOS) inside and at the edges of segments, and when every row ends before the last segment.
    (The default path is also checked against transformers and a teacher-forced forward above.)"""
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=8, n=2, temperature=temperature, top_p=0.9, eos_ids=(V - 1,),
                                     prompt_buckets=BUCKETS)
    # prompt bucket 16; steps 1..7 write slots 16..22; 7 steps in units of ceil(7 / b) slots
    reads = {1: (23,), 4: (18, 20, 22, 23), 7: tuple(range(17, 24))}
    assert sampling.static_read_lengths(16, config, read_buckets) == reads[read_buckets]
    for forced in ([1, 3, 4, 8, 5, 7], [2, 1, 3, 2, 1, 3]):  # the second: every row ends by decode step 2
        whole, out = (jax.device_get(sampling.generate(graphdef, params, PROMPTS, jax.random.key(8), config,
                                                       forced_lengths=forced, read_buckets=b))
                      for b in (1, read_buckets))
        np.testing.assert_array_equal(whole.lengths, forced)  # the forcing, by hand
        np.testing.assert_array_equal(out.tokens, whole.tokens)
        np.testing.assert_allclose(out.logprobs, whole.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out.lengths, whole.lengths)
        np.testing.assert_array_equal(out.truncated, whole.truncated)


def test_sharded_equals_unsharded(checkpoint, split_model):
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=10, n=2, top_p=0.9, prompt_buckets=BUCKETS)
    prompts = PROMPTS + [[7, 7, 2]]
    expected = jax.device_get(sampling.generate(graphdef, params, prompts, jax.random.key(5), config))

    mesh = sharding.make_mesh((2, 2, 2))
    placed = sampling.sampling_params(params, mesh)
    # q_proj [L, D, N, H]: heads split over tensor; weights stay whole along data/fsdp for sampling
    assert placed["layers"]["q_proj"][...].sharding.spec == P(None, None, "tensor", None)
    out = sampling.generate(graphdef, placed, prompts, jax.random.key(5), config, mesh=mesh)
    assert len(out.tokens.sharding.device_set) == 8
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.lengths, expected.lengths)


def test_compiles_once_per_bucket_and_is_deterministic(split_model):
    graphdef, params = split_model
    config = sampling.SamplingConfig(max_new_tokens=4, n=2, prompt_buckets=(4, 8), cache_dtype="bfloat16")
    before = sampling.compiled_variants()
    first = sampling.generate(graphdef, params, [[1, 2], [3, 4, 5]], jax.random.key(6), config)
    again = sampling.generate(graphdef, params, [[1, 2], [3, 4, 5]], jax.random.key(6), config)
    sampling.generate(graphdef, params, [[1], [3, 4, 5, 6]], jax.random.key(7), config)  # same bucket 4
    assert sampling.compiled_variants() == before + 1
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.prompt_index, [0, 0, 1, 1])
    assert not np.array_equal(first.tokens[0], first.tokens[1])  # rows draw independently


def test_bad_input_is_a_clear_error_before_tracing(split_model):
    graphdef, params = split_model
    for field, value, match in [
        ("temperature", -0.1, "temperature"), ("top_p", 0.0, "top_p"), ("top_p", 1.5, r"\(0, 1\]"),
        ("top_k", -1, "top_k"), ("min_p", 2.0, "min_p"), ("max_new_tokens", 0, "max_new_tokens"),
        ("n", 0, "n="), ("cache_dtype", "int8", "cache_dtype"), ("prompt_buckets", (), "prompt_buckets"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampling.SamplingConfig(**{field: value})
    config = sampling.SamplingConfig(max_new_tokens=8, prompt_buckets=(4, 8))
    key = jax.random.key(0)
    before = sampling.compiled_variants()
    for prompts, match in [
        ([[1, 2], []], r"prompts\[1\] is empty"),
        ([list(range(9))], "largest prompt bucket 8"),
        ([[V]], "vocab_size"),
        ([], "non-empty list"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampling.generate(graphdef, params, prompts, key, config)
    long_config = sampling.SamplingConfig(max_new_tokens=250, prompt_buckets=(8,))
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        sampling.generate(graphdef, params, [[1] * 8], key, long_config)
    with pytest.raises(ValueError, match="eos_ids"):
        sampling.generate(graphdef, params, [[1]], key, dataclasses.replace(config, eos_ids=(V,)))
    with pytest.raises(ValueError, match="read_buckets=0"):
        sampling.generate(graphdef, params, [[1]], key, config, read_buckets=0)
    for refill_at, match in [(0, "refill_at=0"), (3, "refill_at=3 is more than the 2 slots")]:
        with pytest.raises(ValueError, match=match):
            sampling.generate_continuous(graphdef, params, [[1]], key, config, slots=2, refill_at=refill_at)
    assert sampling.compiled_variants() == before
