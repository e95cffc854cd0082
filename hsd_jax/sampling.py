"""Jitted generation for Qwen3: one prefill pass, then a `lax.while_loop` decode over a KV cache.

Shapes: `P` prompts, `n` samples per prompt, `B = P * n` rows, `T` prompt bucket length, `M`
max_new_tokens, `S = T + M - 1` cache slots, `V` vocab, `L` layers, `K` kv heads, `H` head dim.

How a call runs (`generate`):
- Host: prompts (ragged token lists) are checked (errors name the field and the fix, before
  anything traces) and left-padded to the smallest bucket `T` of `SamplingConfig.prompt_buckets`
  that fits the longest, so a run compiles once per (P, T, M) and not per prompt length.
- Device, one jitted function: prefill of the P prompts (padding has segment 0, so it is never
  attended; positions count from each prompt's first real token), the cache rows repeated n
  times (row r belongs to prompt r // n), then the decode loop. All rows write the same cache
  slot each step; the loop stops per row on an EOS id or after M tokens and exits as soon as every
  row is done. The loop runs in segments (at most `read_buckets`, `static_read_lengths`), each a
  while loop over a prefix of the cache that ends at a `read_length` bucket, so a step reads the
  slots filled so far rounded up, not all T + M - 1; a segment whose rows are all done runs no
  step. A prefix is a copy written back after its segment (the last segment reads the whole
  cache in place), so earlier segments hold the cache plus their prefix. The cache is allocated
  inside the compiled function (optionally bfloat16) and updated in place, so no cache buffer
  crosses the jit boundary.

Sampling (`sample_tokens`), per row, with HF's order temperature -> top-k -> top-p -> min-p:
- The returned logprob is of the distribution actually sampled from: the temperature-scaled,
  truncated and renormalised one (importance ratios in the trainer start at 1). Temperature 0
  is greedy (argmax); its logprob is that of the untruncated temperature-1 distribution.
- With top_k > 0: `lax.top_k` to k candidates, then top-p / min-p on those (sorted, exact).
- With top_k = 0, top-p keeps token v iff the mass of tokens strictly more likely than v is
  < top_p (HF's rule; tokens tied with the last kept one are all kept). No full-vocabulary sort:
  the cut-off probability is found exactly by bisection on the float32 bit pattern of the
  unnormalised probabilities (one fused masked sum over V per step, <= 30 steps). On CPU rows
  are processed a few at a time so each row's probabilities stay in cache during the search.
- The token is drawn by inverse CDF from one uniform per row over 128-token blocks (block sums,
  then one block), so no V-sized random draw and no V-sized cumsum. Rows use independent keys
  `fold_in(fold_in(key, row), step)`: deterministic for a key, and the same on any mesh.

Sharding: with a mesh, rows are split over the `batch` rule's axes and the KV cache's kv heads
over the `kv_heads` rule's axes; parameters keep their own shardings (see `sampling_params`).

Continuous batching (`generate_continuous`, one process; on a mesh, slots are split like `generate`'s
rows): the same rows and results with a
fixed number of decode slots, for long-tailed lengths where the static loop keeps finished rows
in the batch until the longest ends. A host loop alternates two jitted calls over one device
state (slot cache of T + M - 1 slots per decode slot, per-slot row / step / last token, outputs
[B, M], and a staging area of `slots` prefilled rows): `_stage_rows` prefills the next `slots`
pending rows' prompts at once (one full-width call, so the LM head and the weights are read once
per `slots` rows, not once per finished row) and draws their first token; `_decode_steps` runs
up to `steps_per_call` decode steps for all slots, each slot writing its own cache slot
(`KVCache.index` per row), moves staged rows into the slots that are free before the first step
and after each (`_fill_free_slots`, inside the loop: no host round trip per finished row), and
returns early only when `refill_at` slots are free with no staged row left while rows wait. Row r's
t-th token uses the key fold_in(row_keys[r], t) whichever slot holds it (`row_keys`: fold_in(key, r)
for one key, or given per row to reproduce several `generate` calls), so results do not
depend on scheduling and equal `generate`'s (logprobs to float rounding: batch sizes differ).
Attention reads a length-bucketed prefix of the cache (`_loop_on_prefix`, shared with the static
engine's segments): each decode call slices the first `read_length` slots (prompt bucket + the
busiest slot's reach, rounded up to one of `read_buckets` lengths), decodes on that slice and
writes it back. Chosen over a paged cache
because XLA needs static shapes: a paged read is a per-step gather (a copy of every page read)
or a custom kernel, while the bucketed slice costs one copy per call and at most
`read_buckets` compiled programs; it reads up to the longest busy row's length for every slot.
Utilisation (`DecodeStats`, both engines): useful decode tokens / (slots x decode steps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hsd_jax import sharding
from hsd_jax._models import qwen3

# Sampling keeps weights whole along the data/fsdp axes (an all-gather per decode step would cost
# more than the memory saved) and splits heads, MLP and vocab over the tensor axis.
SAMPLING_RULES: dict[str, tuple[str, ...]] = {**sharding.DEFAULT_RULES, "embed": ()}
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_BLOCK = 128  # tokens per block of the two-level inverse-CDF draw
_ONE_BITS = 0x3F800000  # float32 bit pattern of 1.0
_CHUNK_ELEMENTS = 2**20  # CPU: logits per row chunk of the full-vocabulary search (4 MiB, L3-resident; measured
# interleaved at [32, 151936]: 20 % faster than one row of 1 MiB at a time, fewer and longer loops)
STATIC_READ_BUCKETS = 4  # `generate`'s default decode segments (each a copy of the decode step in its program)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """What to generate and how to sample. Hashable: the jitted sampler compiles per config.

    temperature: 0 = greedy.  top_p: in (0, 1], 1 = off.  top_k: 0 = off.  min_p: 0 = off.
    n: samples per prompt.  eos_ids: ids that end a row (the EOS is kept and counted).
    prompt_buckets: prompt lengths that compile (a prompt is left-padded to the smallest that fits).
    cache_dtype: KV cache dtype ("bfloat16", "float32", ...); None = the model's compute dtype.
    pad_id: token written after a row ends.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    cache_dtype: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        object.__setattr__(self, "prompt_buckets", tuple(sorted(int(b) for b in self.prompt_buckets)))

        def need(ok: bool, field: str, fix: str):
            if not ok:
                raise ValueError(f"SamplingConfig.{field}={getattr(self, field)!r}: {fix}.")

        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "use an int >= 1")
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "use a float >= 0 (0 = greedy)")
        need(0 < self.top_p <= 1, "top_p", "use a value in (0, 1] (1 = off)")
        need(_is_int(self.top_k) and self.top_k >= 0, "top_k", "use an int >= 0 (0 = off)")
        need(0 <= self.min_p <= 1, "min_p", "use a value in [0, 1] (0 = off)")
        need(_is_int(self.n) and self.n >= 1, "n", "use an int >= 1 samples per prompt")
        need(all(i >= 0 for i in self.eos_ids), "eos_ids", "use non-negative token ids")
        need(_is_int(self.pad_id) and self.pad_id >= 0, "pad_id", "use a non-negative token id")
        need(bool(self.prompt_buckets) and self.prompt_buckets[0] >= 1, "prompt_buckets", "give at least one length >= 1")
        need(self.cache_dtype is None or self.cache_dtype in qwen3.DTYPES, "cache_dtype", f"use None or one of {sorted(qwen3.DTYPES)}")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollouts:
    """Generated rows; row r continues prompt `prompt_index[r]` (= r // n).

    tokens:       [B, M] int32    generated ids; pad_id after a row's EOS
    logprobs:     [B, M] float32  log-prob of each token under the distribution it was drawn from; 0 after the end
    lengths:      [B] int32       generated tokens per row, the EOS included
    truncated:    [B] bool        no EOS within max_new_tokens
    prompt_index: [B] int32       which prompt each row continues
    """

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    truncated: jax.Array
    prompt_index: jax.Array


# ----------------------------------------------------------------------------------------------
# Sampling from logits
# ----------------------------------------------------------------------------------------------


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _float(b: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _row_sums(*terms: jax.Array) -> tuple[jax.Array, ...]:
    """Sums over the last axis of several [b, V] terms in one pass (a multi-output reduce: XLA:CPU
    fuses the terms' elementwise producers into it instead of writing each term out)."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    return jax.lax.reduce(terms, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (terms[0].ndim - 1,))


def top_p_threshold(e: jax.Array, top_p: float) -> jax.Array:
    """Smallest kept value of top-p over unnormalised probabilities e [b, V] (max 1) -> [b].

    Token v is kept iff F(e_v) < top_p * Z, where F(t) = sum of e_u > t and Z = sum e; F falls as
    t grows, so the kept set is {e >= tau} for the smallest float tau with F(tau) < top_p * Z.
    Positive floats order like their int32 bit patterns, so bisection over the bits finds tau
    exactly. Invariant: F(lo) >= top_p * Z > F(hi). It starts from hi = 1 (F = 0) and lo just
    below (1 - top_p) * Z / V, a bound tau always exceeds, so it takes <= 30 steps. A row stops
    early once no e lies strictly between lo and hi: then F(t) = F(lo) for lo < t < hi, so tau = hi.
    Each step is one pass over e: the mass above the midpoint and the count inside (lo, hi).
    """
    z = jnp.sum(e, axis=-1)
    target = top_p * z
    lo = _bits((1.0 - top_p) * z / (2 * e.shape[-1]))
    hi = jnp.full_like(lo, _ONE_BITS)
    column = lambda bits: _float(bits)[:, None]

    def step(search):
        lo, hi, _ = search
        mid = lo + (hi - lo) // 2
        mass_above, inside = _row_sums(jnp.where(e > column(mid), e, 0.0),
                                       ((e > column(lo)) & (e < column(hi))).astype(jnp.int32))
        kept = mass_above < target
        return jnp.where(kept, lo, mid), jnp.where(kept, mid, hi), inside == 0  # the empty stay empty

    searching = lambda search: jnp.any((search[1] - search[0] > 1) & ~search[2])
    _, hi, _ = jax.lax.while_loop(searching, step, (lo, hi, jnp.zeros(lo.shape, bool)))
    return _float(hi)


def _first_above(cumulative: jax.Array, weights: jax.Array, r: jax.Array) -> jax.Array:
    """Index of the first cumulative [b, C] > r [b]; the last positive weight if rounding leaves none."""
    idx = jnp.sum(cumulative <= r[:, None], axis=-1)
    last = jnp.max(jnp.where(weights > 0, jnp.arange(weights.shape[-1]), 0), axis=-1)
    return jnp.where(idx < weights.shape[-1], idx, last).astype(jnp.int32)


def inverse_cdf(q: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draws index v with probability q_v / sum q from weights q [b, V] >= 0 and uniforms u [b].

    Two levels (sums of 128-token blocks, then the chosen block), so no V-sized cumsum and one
    uniform per row. A zero weight is never drawn. Returns (index [b] int32, sum q [b]).
    """
    b, V = q.shape
    blocks = jnp.pad(q, ((0, 0), (0, -V % _BLOCK))).reshape(b, -1, _BLOCK)
    block_mass = jnp.sum(blocks, axis=-1)
    block_cum = jnp.cumsum(block_mass, axis=-1)
    total = block_cum[:, -1]
    r = u * total
    j = _first_above(block_cum, block_mass, r)
    before = jnp.where(j > 0, jnp.take_along_axis(block_cum, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]
    i = _first_above(jnp.cumsum(inner, axis=-1), inner, r - before)
    return j * _BLOCK + i, total


def _sample_full_vocab(x: jax.Array, u: jax.Array, top_p: float, min_p: float) -> tuple[jax.Array, jax.Array]:
    """Top-p / min-p sampling over the whole vocabulary. x: scaled logits [b, V], u: [b]."""
    shifted = x - jnp.max(x, axis=-1, keepdims=True)
    e = jnp.exp(shifted)  # max 1
    tau = jnp.zeros(x.shape[:1], jnp.float32)
    if top_p < 1:
        tau = top_p_threshold(e, top_p)
    if min_p > 0:
        tau = jnp.maximum(tau, min_p)  # p_v >= min_p * p_max  <=>  e_v >= min_p
    token, kept_mass = inverse_cdf(jnp.where(e >= tau[:, None], e, 0.0), u)
    logprob = jnp.take_along_axis(shifted, token[:, None], -1)[:, 0] - jnp.log(kept_mass)
    return token, logprob


def _sample_top_k(x: jax.Array, u: jax.Array, top_k: int, top_p: float, min_p: float) -> tuple[jax.Array, jax.Array]:
    """Top-k, then top-p and min-p within the k sorted candidates. x: scaled logits [b, V], u: [b]."""
    values, ids = jax.lax.top_k(x, min(top_k, x.shape[-1]))  # [b, k], descending
    # max, not values[:, :1]: with that slice XLA:CPU rewrites top_k into a full sort (100x slower)
    shifted = values - jnp.max(values, axis=-1, keepdims=True)
    e = jnp.exp(shifted)
    keep = jnp.ones(e.shape, bool)
    if top_p < 1:
        mass_before = jnp.cumsum(e, axis=-1) - e
        keep &= mass_before < top_p * jnp.sum(e, axis=-1, keepdims=True)
    if min_p > 0:
        keep &= e >= min_p
    i, kept_mass = inverse_cdf(jnp.where(keep, e, 0.0), u)
    take = lambda a: jnp.take_along_axis(a, i[:, None], -1)[:, 0]
    return take(ids), take(shifted) - jnp.log(kept_mass)


def _map_rows(fn, arrays: tuple[jax.Array, ...], groups: int) -> tuple[jax.Array, ...]:
    """fn over rows [B, V] on CPU in chunks of about _CHUNK_ELEMENTS (cache-resident), else at once.

    Each chunk takes the same number of rows from each of `groups` contiguous row groups (the
    batch shards), so a sharded batch stays local to its devices.
    """
    B, V = arrays[0].shape[:2]
    per = B // groups
    rows = max([r for r in range(1, max(1, _CHUNK_ELEMENTS // V) + 1) if per % r == 0])
    if jax.default_backend() != "cpu" or B % groups or rows == per:
        return fn(*arrays)
    split = lambda a: a.reshape(groups, per // rows, rows, *a.shape[1:]).transpose(1, 2, 0, *range(3, a.ndim + 2))
    merge = lambda a: a.transpose(2, 0, 1, *range(3, a.ndim)).reshape(B, *a.shape[3:])
    flat = lambda a: a.reshape(rows * groups, *a.shape[2:])
    chunk = lambda xs: tuple(o.reshape(rows, groups, *o.shape[1:]) for o in fn(*map(flat, xs)))
    return tuple(merge(o) for o in jax.lax.map(chunk, tuple(split(a) for a in arrays)))


def sample_tokens(
    logits: jax.Array, keys: jax.Array, config: SamplingConfig, row_groups: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row. logits [B, V] float32, keys [B] -> (tokens [B] int32, logprobs [B]).

    logprobs are of the temperature-scaled, truncated, renormalised distribution sampled from
    (for temperature 0: argmax, with the untruncated temperature-1 logprob). `row_groups` is the
    number of batch shards (keeps the CPU row chunking local to each shard).
    """
    logits = logits.astype(jnp.float32)
    if config.temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logprob = jnp.take_along_axis(logits, token[:, None], -1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
        return token, logprob
    x = logits / config.temperature
    u = jax.vmap(jax.random.uniform)(keys)
    if config.top_k:
        return _sample_top_k(x, u, config.top_k, config.top_p, config.min_p)
    sample = lambda x, u: _sample_full_vocab(x, u, config.top_p, config.min_p)
    return _map_rows(sample, (x, u), row_groups)


# ----------------------------------------------------------------------------------------------
# Host side: checks, buckets, padding
# ----------------------------------------------------------------------------------------------


def prompt_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for bucket in sorted(buckets):
        if bucket >= length:
            return bucket
    raise ValueError(f"prompt of {length} tokens is longer than the largest prompt bucket {max(buckets)}: "
                     "add a larger length to SamplingConfig.prompt_buckets or shorten the prompt.")


def check_prompts(prompts: Sequence[Sequence[int]], config: SamplingConfig, model_config: qwen3.Qwen3Config) -> None:
    """Raises ValueError naming the problem and the fix; runs before anything traces."""
    V, context = model_config.vocab_size, model_config.max_position_embeddings
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)) or len(prompts) == 0:
        raise ValueError("prompts: pass a non-empty list of token-id lists (tokenise text first).")
    for field, ids in (("eos_ids", config.eos_ids), ("pad_id", (config.pad_id,))):
        if any(i >= V for i in ids):
            raise ValueError(f"SamplingConfig.{field}={getattr(config, field)!r}: ids must be < vocab_size={V}.")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)):
            raise ValueError(f"prompts[{i}] is {type(prompt).__name__}: pass a list of token ids.")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token (e.g. BOS).")
        if len(prompt) + config.max_new_tokens > context:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens; with max_new_tokens={config.max_new_tokens} that exceeds "
                f"the context window max_position_embeddings={context}: shorten the prompt or lower max_new_tokens."
            )
        ids = np.asarray(prompt)
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"prompts[{i}] has ids outside [0, vocab_size={V}): pass integer token ids.")
        prompt_bucket(len(prompt), config.prompt_buckets)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to `length`: (tokens [P, length] int32, pad lengths [P] int32)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    pads = np.array([length - len(p) for p in prompts], np.int32)
    for row, (prompt, pad) in enumerate(zip(prompts, pads)):
        tokens[row, pad:] = prompt
    return tokens, pads


def check_counts(function: str, **counts: Any) -> None:
    """ValueError naming the argument unless every value of `counts` is an int >= 1."""
    for name, value in counts.items():
        if not (_is_int(value) and value >= 1):
            raise ValueError(f"{function}: {name}={value!r}, use an int >= 1.")


def row_keys(key: jax.Array, rows: int) -> jax.Array:
    """The PRNG streams of `rows` rows sampled with `key` -> [rows] keys, fold_in(key, r); row r
    draws its t-th token with fold_in(row_keys[r], t) in either engine."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(rows))


def check_forced_lengths(forced_lengths: Sequence[int] | None, rows: int, config: SamplingConfig) -> np.ndarray | None:
    """forced_lengths as int32 [rows] (or None); ValueError naming the fix when unusable."""
    if forced_lengths is None:
        return None
    lengths = np.asarray(forced_lengths)
    if not config.eos_ids:
        raise ValueError("forced_lengths needs an EOS to force: set SamplingConfig.eos_ids.")
    if lengths.shape != (rows,) or not np.issubdtype(lengths.dtype, np.integer) or lengths.min() < 1:
        raise ValueError(f"forced_lengths: pass {rows} ints >= 1 (one per row, P * n), not shape {lengths.shape}.")
    return lengths.astype(np.int32)


def force_eos(logits: jax.Array, steps: jax.Array, forced_lengths: jax.Array, config: SamplingConfig) -> jax.Array:
    """Makes rows end at a chosen length: where steps == forced_lengths - 1 ([] or [B], [B]), the
    logits [B, V] allow only eos_ids[0], which is then drawn with logprob 0 under any setting."""
    only_eos = jnp.where(jnp.arange(logits.shape[-1]) == config.eos_ids[0], 0.0, -1e9)
    return jnp.where((steps == forced_lengths - 1)[:, None], only_eos, logits)


# ----------------------------------------------------------------------------------------------
# The jitted prefill + decode loop
# ----------------------------------------------------------------------------------------------


def _constrain(x: jax.Array, axes: tuple[str | None, ...], mesh, rules) -> jax.Array:
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, sharding.named_sharding(x.shape, axes, mesh, rules))


def _row_groups(batch: int, mesh, rules) -> int:
    """How many shards the batch axis is split into (1 without a mesh)."""
    if mesh is None:
        return 1
    shard = sharding.named_sharding((batch,), ("batch",), mesh, rules).shard_shape((batch,))[0]
    return batch // shard


def _logits(model, hidden: jax.Array, row_groups: int) -> jax.Array:
    """hidden [B, D] -> float32 logits [B, V], as `model.logits`.

    On CPU, with the rows unsplit (row_groups 1), a tied head (the [V, D] embedding) and
    16 B <= D, the product is taken as embedding @ hidden^T ([V, B], the layout XLA:CPU's GEMM runs
    fastest for a skinny B) and turned to [B, V] by a product with the [B, B] identity: exact for
    finite logits at HIGHEST precision (each output is one logit times 1.0 plus zeros), and faster
    than XLA:CPU's transpose. That product costs B / D of the head's FLOPs, hence the bound on B.
    Measured (ms, median of 7, plain / this): D 512, V 151936: B 16 69.5 / 37.7, B 32 87.7 / 74.8,
    B 64 153.5 / 181.7; D 256, V 32768: B 16 6.7 / 5.8, B 32 10.5 / 13.2. (With the rows split
    over devices, the identity product would sum over the row shards.)
    """
    B, D = hidden.shape
    if jax.default_backend() != "cpu" or row_groups > 1 or not model.config.tie_word_embeddings or 16 * B > D:
        return model.logits(hidden)
    embed = model.embed[...].astype(hidden.dtype)
    by_vocab = jnp.einsum("vd,bd->vb", embed, hidden, preferred_element_type=jnp.float32)
    identity = jnp.eye(B, dtype=jnp.float32)
    return jnp.einsum("bc,vc->bv", identity, by_vocab, precision=jax.lax.Precision.HIGHEST)


def _prefill(model, tokens: jax.Array, pads: jax.Array, config: SamplingConfig, mesh, rules):
    """Runs the P prompts [P, T] and returns (last logits [P, V], the cache of its T slots filled)."""
    P, T = tokens.shape
    slots = jnp.arange(T)[None]
    positions = jnp.maximum(slots - pads[:, None], 0)
    segments = (slots >= pads[:, None]).astype(jnp.int32)
    cache = qwen3.KVCache.init(model.config, P, T, config.cache_dtype)
    cache = cache.map_arrays(lambda a, axes: _constrain(a, axes, mesh, rules))
    hidden, cache = model(tokens, positions, segments, cache)
    return _logits(model, hidden[:, -1], _row_groups(P, mesh, rules)), cache


def _expand_cache(cache: qwen3.KVCache, n: int, slots: int, mesh, rules) -> qwen3.KVCache:
    """Repeats each prompt's cache row n times and adds empty slots up to `slots`."""
    def expand(a, axes):
        batch, length = axes.index("batch"), axes.index("length")
        widths = [(0, slots - a.shape[length]) if d == length else (0, 0) for d in range(a.ndim)]
        return _constrain(jnp.pad(jnp.repeat(a, n, axis=batch), widths), axes, mesh, rules)

    return cache.map_arrays(expand)


def _loop_on_prefix(cache: qwen3.KVCache, read: int, index: jax.Array, running, step, carry, mesh=None, rules=None):
    """`lax.while_loop(running, step, (carry, prefix))` where prefix is the first `read` slots of
    cache (S slots) with write index `index` ([] or [B]), so attention and the per-layer cache
    copies cost `read` slots, not S; the prefix is then written back. step must write only below
    `read`. Returns (carry, cache) with cache.index unchanged. Both engines decode through this."""
    if read == cache.segment_ids.shape[1]:
        carry, prefix = jax.lax.while_loop(running, step, (carry, dataclasses.replace(cache, index=index)))
        return carry, dataclasses.replace(prefix, index=cache.index)
    head = lambda a, axes: _constrain(jax.lax.slice_in_dim(a, 0, read, axis=axes.index("length")), axes, mesh, rules)
    prefix = dataclasses.replace(cache.map_arrays(head), index=index)
    carry, prefix = jax.lax.while_loop(running, step, (carry, prefix))
    write = lambda a, b: jax.lax.dynamic_update_slice(a, b, (0,) * a.ndim)
    return carry, qwen3.KVCache(k=write(cache.k, prefix.k), v=write(cache.v, prefix.v),
                                segment_ids=write(cache.segment_ids, prefix.segment_ids), index=cache.index)


def read_length(prompt_bucket_length: int, needed: int, config: SamplingConfig, read_buckets: int) -> int:
    """Cache slots a decode call reads: the prompt bucket plus `needed` generated slots rounded up
    to a multiple of ceil((M - 1) / read_buckets), so at most `read_buckets` decode programs
    compile per prompt bucket."""
    M = config.max_new_tokens
    unit = max(1, -(-(M - 1) // read_buckets))
    return prompt_bucket_length + min(M - 1, -(-needed // unit) * unit)


def static_read_lengths(prompt_bucket_length: int, config: SamplingConfig, read_buckets: int) -> tuple[int, ...]:
    """Cache slots each decode segment of `generate` reads, ascending: the `read_length` buckets
    that decode steps 1 .. M - 1 need (step t writes slot T + t - 1); at most `read_buckets`."""
    steps = range(1, config.max_new_tokens)
    return tuple(sorted({read_length(prompt_bucket_length, t, config, read_buckets) for t in steps}))


def _generate(graphdef, params, tokens, pads, key, forced_lengths, config: SamplingConfig, mesh, rules_items,
              read_buckets: int = STATIC_READ_BUCKETS) -> Rollouts:
    """tokens [P, T] left-padded, pads [P], forced_lengths [B] or None -> Rollouts of B = P * n rows
    (see module docstring)."""
    rules = None if rules_items is None else dict(rules_items)
    model = nnx.merge(graphdef, params)
    P, T = tokens.shape
    n, M = config.n, config.max_new_tokens
    B = P * n
    batch = lambda x: _constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh, rules)
    groups = _row_groups(B, mesh, rules)
    eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
    keys_of_rows = batch(row_keys(key, B))

    def draw(logits, step):
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys_of_rows, step)
        if forced_lengths is not None:
            logits = force_eos(logits, step, forced_lengths, config)
        return sample_tokens(logits, keys, config, groups)

    logits, cache = _prefill(model, tokens, pads, config, mesh, rules)
    cache = _expand_cache(cache, n, T + M - 1, mesh, rules)
    prompt_lengths = batch(jnp.repeat(T - pads, n))  # = position of the first generated token
    token, logprob = draw(batch(jnp.repeat(logits, n, axis=0)), 0)
    s = dict(
        step=jnp.ones((), jnp.int32), token=token, ended=jnp.any(token[:, None] == eos, axis=-1),
        tokens=batch(jnp.full((B, M), config.pad_id, jnp.int32).at[:, 0].set(token)),
        logprobs=batch(jnp.zeros((B, M), jnp.float32).at[:, 0].set(logprob)),
        lengths=batch(jnp.ones((B,), jnp.int32)),
    )

    def decode(carry):
        s, cache = carry
        step = s["step"]
        positions = (prompt_lengths + step - 1)[:, None]
        cache = dataclasses.replace(cache, index=T + step - 1)
        hidden, cache = model(s["token"][:, None], positions, jnp.ones((B, 1), jnp.int32), cache)
        token, logprob = draw(_logits(model, hidden[:, 0], groups), step)
        active = ~s["ended"]
        token = jnp.where(active, token, config.pad_id)
        column = lambda out, x: jax.lax.dynamic_update_slice(out, x[:, None], (0, step))
        return dict(
            step=step + 1, token=token,
            ended=s["ended"] | jnp.any(token[:, None] == eos, axis=-1),
            tokens=column(s["tokens"], token),
            logprobs=column(s["logprobs"], jnp.where(active, logprob, 0.0)),
            lengths=s["lengths"] + active,
        ), cache

    for read in static_read_lengths(T, config, read_buckets):
        last_step = read - T  # the step that writes the prefix's last slot
        running = lambda carry, last_step=last_step: (carry[0]["step"] <= last_step) & ~jnp.all(carry[0]["ended"])
        s, cache = _loop_on_prefix(cache, read, jnp.zeros((), jnp.int32), running, decode, s, mesh, rules)
    return Rollouts(
        tokens=s["tokens"], logprobs=s["logprobs"], lengths=s["lengths"], truncated=~s["ended"],
        prompt_index=batch(jnp.arange(B, dtype=jnp.int32) // n),
    )


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "config", "mesh", "rules_items", "read_buckets"))


def compiled_variants() -> int:
    """How many sampler programs `generate` holds compiled in this process: one per distinct
    (model, prompt count, prompt bucket, config, mesh, rules). For checking that new prompts
    reuse a compiled program."""
    return _generate_jit._cache_size()


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    config: SamplingConfig,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
    forced_lengths: Sequence[int] | None = None,
    read_buckets: int = STATIC_READ_BUCKETS,
) -> Rollouts:
    """Samples config.n continuations of each prompt (ragged token-id lists) -> Rollouts [P * n].

    graphdef, params: `nnx.split(model)` of a `models.qwen3.Qwen3` (params as placed; see
    `sampling_params`). With a mesh, rows are sharded by `rules` (default SAMPLING_RULES).
    Compiles once per (len(prompts), prompt bucket, max_new_tokens), config and read_buckets.

    The decode loop runs in up to `read_buckets` segments, each reading only the cache slots it
    can reach (`static_read_lengths`): more segments read fewer slots per step but make the
    program larger (each holds a copy of the decode step). 1 = every step reads the whole cache.

    Multi-process: each process passes its own prompts (the same number everywhere); together
    they form the global batch, process by process, and the padding bucket comes from the
    longest prompt of any process. The result is global: `sharding.global_to_host` gives a
    process its rows [P_local * n].

    forced_lengths (benchmarks and tests; single process): [P * n] lengths at which rows are
    made to end, see `force_eos`.
    """
    model_config = nnx.merge(graphdef, params).config
    check_prompts(prompts, config, model_config)
    check_counts("generate", read_buckets=read_buckets)
    forced_lengths = check_forced_lengths(forced_lengths, len(prompts) * config.n, config)
    longest = int(sharding.agree_max([max(len(p) for p in prompts)])[0])
    tokens, pads = left_pad(prompts, prompt_bucket(longest, config.prompt_buckets), config.pad_id)
    rules_items = None
    if mesh is not None:
        rules = SAMPLING_RULES if rules is None else rules
        rules_items = tuple(sorted((k, tuple(v)) for k, v in rules.items()))
        tokens, pads = sharding.host_to_global(tokens, mesh, rules), sharding.host_to_global(pads, mesh, rules)
    return _generate_jit(graphdef, params, tokens, pads, key, forced_lengths, config=config, mesh=mesh,
                         rules_items=rules_items, read_buckets=read_buckets)


def sampling_params(
    params: nnx.State, mesh: jax.sharding.Mesh, rules: dict[str, tuple[str, ...]] | None = None
) -> nnx.State:
    """Moves (training-layout) params into the sampling layout on `mesh`, one array at a time.

    The layout comes from each parameter's logical axes and `rules` (default SAMPLING_RULES:
    weights split over the tensor axis only). Peak extra memory is one parameter in flight.
    """
    rules = SAMPLING_RULES if rules is None else rules
    is_var = lambda x: isinstance(x, nnx.Variable)
    targets = jax.tree.map(
        lambda v: v.replace(sharding.named_sharding(v.shape, v.logical_axes, mesh, rules)), params, is_leaf=is_var
    )
    return sharding.reshard(params, targets)


# ----------------------------------------------------------------------------------------------
# Continuous batching: a fixed number of decode slots, refilled as rows finish
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeStats:
    """How full the decode steps of a call were.

    slots: rows per decode step.  decode_steps: batched decode steps run.
    useful_tokens: tokens drawn by decode steps, sum(lengths - 1) (each row's first token comes
    from its prefill). utilisation = useful_tokens / (slots * decode_steps).
    """

    slots: int
    decode_steps: int
    useful_tokens: int

    @property
    def utilisation(self) -> float:
        return self.useful_tokens / max(1, self.slots * self.decode_steps)


def static_stats(rollouts: Rollouts) -> DecodeStats:
    """`generate`'s DecodeStats: all B rows decode together until the longest ends (max(lengths) - 1 steps)."""
    lengths = np.asarray(jax.device_get(rollouts.lengths))
    return DecodeStats(len(lengths), int(lengths.max()) - 1, int((lengths - 1).sum()))


def _draw_rows(logits, keys, rows, steps, forced_lengths, config: SamplingConfig, row_groups: int):
    """Token `steps[i]` of row `rows[i]` from logits [slots, V] with the row's stream keys[rows[i]]
    (keys [R]; a row index R is padding and clamps) -> (tokens, logprobs) [slots]."""
    rows = jnp.minimum(rows, len(keys) - 1)
    if forced_lengths is not None:
        logits = force_eos(logits, steps, forced_lengths[rows], config)
    return sample_tokens(logits, jax.vmap(jax.random.fold_in)(keys[rows], steps), config, row_groups)


def _is_eos(token: jax.Array, config: SamplingConfig) -> jax.Array:
    return jnp.any(token[:, None] == jnp.asarray(config.eos_ids or (-1,), jnp.int32), axis=-1)


def _busy(state, rows: int, config: SamplingConfig) -> jax.Array:
    """[slots] bool: the slot holds a row that has not ended (EOS) or reached max_new_tokens."""
    return (state["row"] < rows) & ~state["ended"] & (state["step"] < config.max_new_tokens)


def _empty_state(model_config: qwen3.Qwen3Config, slots: int, rows: int, T: int, config: SamplingConfig, mesh,
                 rules_items):
    """Device state of the continuous engine: slot fields [slots] and cache [.., slots, T + M - 1, ..],
    outputs [rows, M], and `staged`: the same slot fields and a cache of T slots for up to `slots`
    prefilled rows waiting for a decode slot (a prefix of them; rows = none), placed in order from
    `staged_next`.

    row: the row a slot holds (rows = none); step: tokens that row has drawn; token: its last
    token; ended: it drew an EOS; prompt_length: its first generated position.
    """
    M = config.max_new_tokens
    slot = lambda value, dtype=jnp.int32: jnp.full((slots,), value, dtype)
    slot_fields = lambda columns: dict(
        cache=qwen3.KVCache.init(model_config, slots, columns, config.cache_dtype),
        row=slot(rows), step=slot(0), token=slot(config.pad_id), ended=slot(False, bool), prompt_length=slot(0),
    )
    rules = None if rules_items is None else dict(rules_items)
    return _constrain_state(dict(
        slot_fields(T + M - 1), staged=slot_fields(T),
        tokens=jnp.full((rows, M), config.pad_id, jnp.int32), logprobs=jnp.zeros((rows, M), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32), row_ended=jnp.zeros((rows,), bool), decode_steps=jnp.zeros((), jnp.int32),
        staged_next=jnp.zeros((), jnp.int32),
    ), mesh, rules)


_SLOT_FIELDS = ("row", "step", "token", "ended", "prompt_length")


def _state_shardings(state, mesh, rules) -> dict:
    """Where the continuous engine's state lives on `mesh`: the cache as the static engine's
    (slots over the batch axes, kv heads over the kv_heads axes), the slot fields [slots] over the
    batch axes, the per-row outputs and counters replicated (small; rows land in them by scatter)."""
    def axes_of(state):
        axes = {name: ("batch",) if name in _SLOT_FIELDS else (None,) * x.ndim
                for name, x in state.items() if name not in ("cache", "staged")}
        axes["cache"] = qwen3.KVCache(**qwen3.KVCache.AXES)
        if "staged" in state:
            axes["staged"] = axes_of(state["staged"])
        return axes

    return jax.tree.map(lambda x, names: sharding.named_sharding(x.shape, names, mesh, rules), state, axes_of(state))


def _constrain_state(state, mesh, rules) -> dict:
    """Inside jit: keeps the state in `_state_shardings` (so every call sees the same input layout)."""
    return state if mesh is None else jax.lax.with_sharding_constraint(state, _state_shardings(state, mesh, rules))


def _stage_rows(graphdef, params, state, keys, rows, tokens, pads, forced_lengths, config: SamplingConfig,
                mesh, rules_items):
    """Prefills the prompts tokens [slots, T] (left-padded, pads [slots]) of rows [slots] into the
    staging area and draws each row's first token with its stream keys[row] (keys [R]), written to
    the outputs at once. Entries with rows = R are padding (dropped), after the real ones."""
    rules = None if rules_items is None else dict(rules_items)
    model = nnx.merge(graphdef, params)
    logits, cache = _prefill(model, tokens, pads, config, mesh, rules)
    token, logprob = _draw_rows(logits, keys, rows, jnp.zeros_like(rows), forced_lengths, config,
                                _row_groups(len(rows), mesh, rules))
    put_row = lambda a, x: a.at[rows].set(x, mode="drop")
    ended = _is_eos(token, config)
    staged = dict(cache=cache, row=rows, step=jnp.ones_like(rows), token=token, ended=ended,
                  prompt_length=tokens.shape[1] - pads)
    return _constrain_state(dict(
        state, staged=staged, staged_next=jnp.zeros((), jnp.int32),
        tokens=state["tokens"].at[rows, 0].set(token, mode="drop"),
        logprobs=state["logprobs"].at[rows, 0].set(logprob, mode="drop"),
        lengths=put_row(state["lengths"], 1), row_ended=put_row(state["row_ended"], ended),
    ), mesh, rules)


def _place(s, cache: qwen3.KVCache, staged, slot_ids, staged_ids):
    """Moves the staged rows staged_ids [slots] into the decode slots slot_ids [slots] of the slot
    fields s and cache: their prompt keys and values (cache slots [0, T); the previous occupant's
    later ones are masked by causality until overwritten), segment ids (every slot of `cache`,
    which inside a decode loop is its read prefix: the rest is masked by causality too) and slot
    fields. Entries with slot_ids = slots are padding (dropped). Returns (s, cache)."""
    pick = lambda a, axis: jnp.take(a, staged_ids, axis=axis, mode="clip")
    put = lambda a, x: a.at[slot_ids].set(x, mode="drop")

    def put_prompt(name):  # the staged rows' cache slots [0, T) into the decode slots' [0, T)
        axes = qwen3.KVCache.AXES[name]
        prompt = pick(getattr(staged["cache"], name), axes.index("batch"))
        index = tuple(slot_ids if axis == "batch" else slice(0, prompt.shape[d]) if axis == "length" else slice(None)
                      for d, axis in enumerate(axes))
        return getattr(cache, name).at[index].set(prompt, mode="drop")

    segments = pick(staged["cache"].segment_ids, 0)
    segments = jnp.pad(segments, ((0, 0), (0, cache.segment_ids.shape[1] - segments.shape[1])))
    cache = dataclasses.replace(cache, k=put_prompt("k"), v=put_prompt("v"),
                                segment_ids=put(cache.segment_ids, segments))
    return dict(s, **{name: put(s[name], pick(staged[name], 0)) for name in _SLOT_FIELDS}), cache


def _fill_free_slots(s, cache: qwen3.KVCache, staged, rows: int, config: SamplingConfig):
    """Places the next staged rows (from s["staged_next"], in order) into the free slots (in slot
    order), as many as both allow; a placed row that has already ended (EOS as its first token)
    leaves its slot free until the next fill. Returns (s, cache)."""
    free = ~_busy(s, rows, config)
    staged_ids = s["staged_next"] + jnp.cumsum(free) - 1
    fill = free & (jnp.take(staged["row"], staged_ids, mode="fill", fill_value=rows) < rows)
    slot_ids = jnp.where(fill, jnp.arange(len(free)), len(free))
    s = dict(s, staged_next=s["staged_next"] + jnp.sum(fill))
    return jax.lax.cond(jnp.any(fill), lambda: _place(s, cache, staged, slot_ids, staged_ids), lambda: (s, cache))


def _decode_steps(graphdef, params, state, keys, refill_at, forced_lengths, config: SamplingConfig, steps: int,
                  read: int, mesh, rules_items):
    """Runs up to `steps` decode steps for all slots, filling free slots with staged rows before
    the first step and after each (`_fill_free_slots`), reading and writing only the first `read`
    cache slots (the host picks `read` >= every busy slot's need). Stops early when no slot is busy,
    or when `refill_at` slots are free after a fill (the host passes min(its refill_at, rows it has
    not staged yet), or more than `slots` when none): the staging area is empty then, so the host
    can stage more, or rows placed just now ended at their first token (the next call places more)."""
    rules = None if rules_items is None else dict(rules_items)
    model = nnx.merge(graphdef, params)
    rows, M = state["tokens"].shape
    T = state["cache"].segment_ids.shape[1] - M + 1  # prompt bucket
    slots = state["cache"].k.shape[1]
    groups = _row_groups(slots, mesh, rules)
    ones = jnp.ones((slots, 1), jnp.int32)

    def step(carry):
        (i, s), cache = carry
        live = _busy(s, rows, config)
        positions = (s["prompt_length"] + s["step"] - 1)[:, None]
        index = jnp.minimum(T + s["step"] - 1, read - 1)  # only idle slots are clamped; their writes are never read
        hidden, cache = model(s["token"][:, None], positions, ones, dataclasses.replace(cache, index=index))
        logits = _logits(model, hidden[:, 0], groups)
        token, logprob = _draw_rows(logits, keys, s["row"], s["step"], forced_lengths, config, groups)
        target = jnp.where(live, s["row"], rows)  # rows = dropped
        ended = s["ended"] | (live & _is_eos(token, config))
        s = dict(
            s, token=jnp.where(live, token, s["token"]), ended=ended, step=s["step"] + live,
            tokens=s["tokens"].at[target, s["step"]].set(token, mode="drop"),
            logprobs=s["logprobs"].at[target, s["step"]].set(logprob, mode="drop"),
            lengths=s["lengths"].at[target].set(s["step"] + 1, mode="drop"),
            row_ended=s["row_ended"].at[target].set(ended, mode="drop"),
            decode_steps=s["decode_steps"] + 1,
        )
        s, cache = _fill_free_slots(s, cache, state["staged"], rows, config)
        return (i + 1, s), cache

    def running(carry):
        (i, s), _ = carry
        busy = _busy(s, rows, config)
        return (i < steps) & jnp.any(busy) & (jnp.sum(~busy) < refill_at)

    fields = {name: value for name, value in state.items() if name not in ("cache", "staged")}
    fields, cache = _fill_free_slots(fields, state["cache"], state["staged"], rows, config)
    index = jnp.zeros((slots,), jnp.int32)  # set per step
    (_, s), cache = _loop_on_prefix(cache, read, index, running, step, (jnp.zeros((), jnp.int32), fields), mesh, rules)
    return _constrain_state(dict(s, cache=cache, staged=state["staged"]), mesh, rules)


_empty_state_jit = jax.jit(_empty_state, static_argnums=range(7))
_stage_rows_jit = jax.jit(_stage_rows, static_argnames=("graphdef", "config", "mesh", "rules_items"),
                          donate_argnames="state")
_decode_steps_jit = jax.jit(_decode_steps, static_argnames=("graphdef", "config", "steps", "read", "mesh", "rules_items"),
                            donate_argnames="state")


def generate_continuous(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    config: SamplingConfig,
    slots: int,
    steps_per_call: int = 8,
    read_buckets: int = 8,
    refill_at: int = 1,
    forced_lengths: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
) -> tuple[Rollouts, DecodeStats]:
    """`generate`'s rows and results with `slots` decode slots that are refilled as rows finish.

    The host loop: prefill the next `slots` pending rows into the staging area (one jitted call)
    whenever it is empty, then run up to `steps_per_call` decode steps for all slots (one jitted
    call, which places staged rows into slots as they free, and returns early once `refill_at`
    slots are free with no staged row left while rows wait), until every row is done. refill_at > 1
    trades idle slots for fewer host round trips (measured on CPU: 1 is faster).

    key: one key, or [P * n] keys, one per row (`row_keys` of several `generate` calls' keys, to
    reproduce them in one call). Row r draws its t-th token with fold_in(row key r, t), whichever
    slot holds it, where a single key gives row keys `row_keys(key, P * n)`: so tokens, logprobs,
    lengths and truncation equal `generate`'s for the same keys. Each decode call reads only the
    cache slots the busiest slot can reach in it (see `read_length`; `read_buckets` trades
    compiled programs for slots read). mesh: slots and the cache split as `generate`'s rows (by
    `rules`, default SAMPLING_RULES); one process only. forced_lengths: as in `generate`.
    Returns (Rollouts [P * n], DecodeStats).
    """
    model_config = nnx.merge(graphdef, params).config
    check_prompts(prompts, config, model_config)
    check_counts("generate_continuous", slots=slots, steps_per_call=steps_per_call, read_buckets=read_buckets,
                 refill_at=refill_at)
    if refill_at > slots:
        raise ValueError(f"generate_continuous: refill_at={refill_at} is more than the {slots} slots; use 1 .. slots.")
    if jax.process_count() > 1:
        raise ValueError(f"generate_continuous runs in one process, not {jax.process_count()}: use `generate` "
                         "(config.sampling.engine='static') on several hosts.")
    rows, n, M = len(prompts) * config.n, config.n, config.max_new_tokens
    keys = key if jnp.ndim(key) == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2) else row_keys(key, rows)
    if len(keys) != rows:
        raise ValueError(f"generate_continuous: key holds {len(keys)} row keys for {rows} rows (P * n); pass one key "
                         "or one per row.")
    forced = check_forced_lengths(forced_lengths, rows, config)
    T = prompt_bucket(max(len(p) for p in prompts), config.prompt_buckets)
    tokens, pads = left_pad(prompts, T, config.pad_id)
    rules_items = None
    if mesh is not None:
        rules = SAMPLING_RULES if rules is None else rules
        rules_items = tuple(sorted((k, tuple(v)) for k, v in rules.items()))
    state = _empty_state_jit(model_config, slots, rows, T, config, mesh, rules_items)
    options = dict(config=config, mesh=mesh, rules_items=rules_items)
    pending, staged_count = list(range(rows)), 0  # rows not yet prefilled; rows in the staging area
    while True:
        row, step, ended, staged_next = jax.device_get(
            (state["row"], state["step"], state["ended"], state["staged_next"]))
        if pending and staged_next == staged_count:
            staged_count = min(slots, len(pending))
            new_rows = np.full(slots, rows, np.int32)
            new_rows[:staged_count], pending = pending[:staged_count], pending[staged_count:]
            prompt_ids = np.where(new_rows < rows, new_rows // n, 0)
            state = _stage_rows_jit(graphdef, params, state, keys, new_rows, tokens[prompt_ids], pads[prompt_ids],
                                    forced, **options)
            staged_next = 0
        busy = (row < rows) & ~ended & (step < M)
        if not busy.any() and staged_next == staged_count:
            break
        reach = int(step[busy].max()) if busy.any() else 1  # placed rows have drawn 1 token
        read = read_length(T, reach + steps_per_call - 1, config, read_buckets)
        state = _decode_steps_jit(graphdef, params, state, keys, min(refill_at, len(pending)) if pending else slots + 1,
                                  forced, steps=steps_per_call, read=read, **options)
    lengths = state["lengths"]
    out = Rollouts(tokens=state["tokens"], logprobs=state["logprobs"], lengths=lengths, truncated=~state["row_ended"],
                   prompt_index=jnp.arange(rows, dtype=jnp.int32) // n)
    return out, DecodeStats(slots, int(state["decode_steps"]), int(jnp.sum(lengths - 1)))
