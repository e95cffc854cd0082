"""Qwen3 dense decoder in Flax NNX, with an explicit KV cache. Nothing about training.

The equations follow Hugging Face's `Qwen3ForCausalLM`:

    x_0      = E[tokens]
    h        = x + Attn(RMSNorm(x))          Attn: GQA, per-head RMSNorm on q and k, then RoPE
    x_{l+1}  = h + W_down(silu(W_gate RMSNorm(h)) * W_up RMSNorm(h))
    hidden   = RMSNorm(x_L)                  logits = hidden @ head, head = E^T when tied

Shapes use B batch, T query time, S key/cache time, D model dim, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, F MLP dim, V vocab, L layers.

The decoder layers are stored stacked (a leading L axis on every layer parameter) and run with
`lax.scan`, so compile time does not grow with depth. Every parameter carries `logical_axes`
metadata (names such as `embed`, `heads`, `vocab`) that `hsd_jax.sharding` maps to mesh axes.

One forward serves training and sampling: `model(tokens, positions, segment_ids, cache)` returns
the final hidden states (LM head not applied, so losses can chunk over the vocabulary) and the
updated cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture (field names as in HF's config.json) plus dtype and remat choices."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"Qwen3Config.{field}={getattr(self, field)!r}: use one of {sorted(DTYPES)}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Qwen3Config.remat={self.remat!r}: use one of {sorted(REMAT_POLICIES)}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config: num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim={self.head_dim} must be even for RoPE.")

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides) -> Qwen3Config:
        """Reads a HF `config.json` (a directory, the file, or its parsed dict)."""
        hf = path_or_dict
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            path = os.path.join(path, "config.json") if os.path.isdir(path) else path
            if not os.path.exists(path):
                raise FileNotFoundError(f"No Qwen3 config at {path}: expected a HF model directory with config.json.")
            with open(path) as f:
                hf = json.load(f)
        architectures = hf.get("architectures") or ["Qwen3ForCausalLM"]
        if hf.get("model_type", "qwen3") != "qwen3" or architectures[0] != "Qwen3ForCausalLM":
            raise ValueError(
                f"Unsupported architecture {architectures[0]!r} (model_type {hf.get('model_type')!r}): "
                "hsd-jax loads dense Qwen3ForCausalLM checkpoints only."
            )
        for flag in ("attention_bias", "use_sliding_window"):
            if hf.get(flag):
                raise ValueError(f"Unsupported Qwen3 option {flag}=true in config.json.")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"Unsupported RoPE scaling {rope}: only the default RoPE is implemented.")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        values.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
        values.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        return cls(**{**values, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that `transformers.Qwen3Config` reads."""
        hf = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("param_dtype", "dtype", "remat"):
            hf.pop(name)
        return {
            **hf,
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "torch_dtype": self.param_dtype,
        }

    @classmethod
    def preset(cls, name: str, **overrides) -> Qwen3Config:
        """The published dense Qwen3 sizes: '0.6b', '1.7b', '4b', '8b', '14b', '32b'."""
        if name not in PRESETS:
            raise ValueError(f"Unknown Qwen3 preset {name!r}: use one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[name], **overrides)


def _preset(hidden, intermediate, layers, heads, tied):
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=tied,
    )


PRESETS = {
    "0.6b": _preset(1024, 3072, 28, 16, tied=True),
    "1.7b": _preset(2048, 6144, 28, 16, tied=True),
    "4b": _preset(2560, 9728, 36, 32, tied=True),
    "8b": _preset(4096, 12288, 36, 32, tied=False),
    "14b": _preset(5120, 17408, 40, 40, tied=False),
    "32b": _preset(5120, 25600, 64, 64, tied=False),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, written at slot `index` onwards.

    k:            [L, B, K, H, S]  cached keys (after RoPE), stored length-last so that q . k is a
                                   plain matmul per (row, kv head) (with [B, S, K, H], XLA:CPU's
                                   decode attention dots took 3x longer, measured)
    v:            [L, B, K, S, H]  cached values
    segment_ids:  [B, S] int32     segment of each cached slot; 0 marks an empty or padding slot
    index:        [] int32         next slot to write, the same for every row; or
                  [B] int32        each row's own next slot (decode slots of different lengths)

    AXES names each array's logical axes (`hsd_jax.sharding` maps them to a mesh).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("layers", "batch", "kv_heads", "head_dim", "length"),
        "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
        "segment_ids": ("batch", "length"),
        "index": (),
    }

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
        """An empty cache of `max_len` slots; `dtype` defaults to the compute dtype."""
        dtype = DTYPES[dtype or config.dtype]
        L, K, H = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        return cls(
            k=jnp.zeros((L, batch, K, H, max_len), dtype),
            v=jnp.zeros((L, batch, K, max_len, H), dtype),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def map_arrays(self, fn) -> KVCache:
        """The cache with each of k, v, segment_ids replaced by fn(array, its logical axes)."""
        return dataclasses.replace(self, **{name: fn(getattr(self, name), self.AXES[name])
                                            for name in ("k", "v", "segment_ids")})


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding with split-half rotation. x: [B, T, heads, H], positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(
    query_segments: jax.Array, key_segments: jax.Array, query_slots: jax.Array
) -> jax.Array:
    """[B, T, S] bool: causal by slot, same segment, and never a padding (segment 0) key.

    query_slots: [T] (every row) or [B, T] (per row) cache slot of each query."""
    key_slots = jnp.arange(key_segments.shape[1])
    causal = key_slots <= query_slots[..., None]
    same_segment = query_segments[:, :, None] == key_segments[:, None, :]
    return causal & same_segment & (key_segments[:, None, :] != 0)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain causal grouped-query attention (T == S). q: [B, T, N, H], k/v: [B, T, K, H] -> [B, T, N, H].

    It goes through `jax.nn.dot_product_attention`, which uses a fused kernel (cuDNN flash
    attention on GPU) that never holds the [T, S] scores.
    """
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked grouped-query attention on the cache's layout.

    q: [B, T, N, H], k: [B, K, H, S] (length-last), v: [B, K, S, H], mask: [B, T, S] -> [B, T, N, H].
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)  # rows (g, t)
    scores = jnp.matmul(q, k, preferred_element_type=jnp.float32) * H**-0.5  # [B, K, G T, S]
    scores = jnp.where(jnp.tile(mask, (1, G, 1))[:, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.matmul(probs, v)  # [B, K, G T, H]
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def write_at(buffer: jax.Array, update: jax.Array, start: tuple, time_axis: int, index: jax.Array,
             batch_axis: int) -> jax.Array:
    """`lax.dynamic_update_slice(buffer, update, start)` with the time axis started at `index`.

    index: [] writes every row at the same slot; [B] writes row b (along `batch_axis`, where
    `start` holds 0) at slot index[b], as decode slots at different lengths need (there, slots
    past the end are dropped rather than clamped).
    """
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buffer, update, tuple(index if a == time_axis else s for a, s in enumerate(start)))

    def coordinates(axis):  # buffer coordinates of the update's elements along `axis`, broadcastable to update's shape
        shape = [update.shape[axis] if a == axis else 1 for a in range(update.ndim)]
        offsets = jnp.arange(update.shape[axis]).reshape(shape)
        if axis == time_axis:
            return offsets + index.reshape([-1 if a == batch_axis else 1 for a in range(update.ndim)])
        return offsets + start[axis]

    # one scatter; a vmapped dynamic_update_slice made XLA:CPU transpose the whole cache every step
    return buffer.at[tuple(coordinates(a) for a in range(buffer.ndim))].set(update, mode="drop")


def decoder_layer(
    x: jax.Array,
    p: dict[str, jax.Array],
    positions: jax.Array,
    mask: jax.Array | None,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None,
    write_index: jax.Array,
    config: Qwen3Config,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm decoder layer. x: [B, T, D]; p: this layer's parameters.

    cache: (k [L, B, K, H, S], v [L, B, K, S, H]) of all layers and this layer's index l, or None.
    mask None (and no cache): plain causal attention. Otherwise the new keys and values go to the
    cache's layout, are written in place at layer l, slot `write_index` ([] or per row [B]), and
    attention reads layer l's whole (updated) cache. Returns (x, updated (k, v) of all layers or None).
    """
    eps, dtype = config.rms_norm_eps, x.dtype
    h = rms_norm(x, p["attn_norm"], eps)
    q = jnp.einsum("btd,dnh->btnh", h, p["q_proj"].astype(dtype))
    k = jnp.einsum("btd,dkh->btkh", h, p["k_proj"].astype(dtype))
    v = jnp.einsum("btd,dkh->btkh", h, p["v_proj"].astype(dtype))
    q = rope(rms_norm(q, p["q_norm"], eps), positions, config.rope_theta)
    k = rope(rms_norm(k, p["k_norm"], eps), positions, config.rope_theta)
    if mask is None:
        attn = causal_attention(q, k, v)
    else:
        k, v = jnp.transpose(k, (0, 2, 3, 1)), jnp.transpose(v, (0, 2, 1, 3))  # [B, K, H, T], [B, K, T, H]
        if cache is not None:
            k_all, v_all, l = cache
            start = (l, 0, 0, 0, 0)
            k_all = write_at(k_all, k[None].astype(k_all.dtype), start, 4, write_index, batch_axis=1)
            v_all = write_at(v_all, v[None].astype(v_all.dtype), start, 3, write_index, batch_axis=1)
            k, v = k_all[l], v_all[l]
        attn = attention(q, k.astype(dtype), v.astype(dtype), mask)
    x = x + jnp.einsum("btnh,nhd->btd", attn, p["o_proj"].astype(dtype))
    h = rms_norm(x, p["mlp_norm"], eps)
    gate = jnp.einsum("btd,df->btf", h, p["gate_proj"].astype(dtype))
    up = jnp.einsum("btd,df->btf", h, p["up_proj"].astype(dtype))
    x = x + jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down_proj"].astype(dtype))
    return x, None if cache is None else (k_all, v_all)


LAYER_PARAMS = {
    # name: (shape from (D, N, K, H, F), logical axes after the leading `layers` axis)
    "attn_norm": (lambda D, N, K, H, F: (D,), ("norm",)),
    "q_proj": (lambda D, N, K, H, F: (D, N, H), ("embed", "heads", "head_dim")),
    "k_proj": (lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim")),
    "v_proj": (lambda D, N, K, H, F: (D, K, H), ("embed", "kv_heads", "head_dim")),
    "q_norm": (lambda D, N, K, H, F: (H,), ("head_dim",)),
    "k_norm": (lambda D, N, K, H, F: (H,), ("head_dim",)),
    "o_proj": (lambda D, N, K, H, F: (N, H, D), ("heads", "head_dim", "embed")),
    "mlp_norm": (lambda D, N, K, H, F: (D,), ("norm",)),
    "gate_proj": (lambda D, N, K, H, F: (D, F), ("embed", "mlp")),
    "up_proj": (lambda D, N, K, H, F: (D, F), ("embed", "mlp")),
    "down_proj": (lambda D, N, K, H, F: (F, D), ("mlp", "embed")),
}


class DecoderStack(nnx.Module):
    """All L decoder layers' parameters, each stacked along a leading `layers` axis."""

    def __init__(self, config: Qwen3Config, rngs: nnx.Rngs):
        c = config
        dims = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size)
        dtype = DTYPES[c.param_dtype]
        for name, (shape_of, axes) in LAYER_PARAMS.items():
            shape = (c.num_hidden_layers, *shape_of(*dims))
            if axes == ("norm",) or axes == ("head_dim",):
                value = jnp.ones(shape, dtype)
            else:
                value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        """The stacked parameters as a dict of [L, ...] arrays (what `lax.scan` iterates over)."""
        return {name: getattr(self, name)[...] for name in LAYER_PARAMS}


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM. Call it for final hidden states; `logits(hidden)` applies the LM head."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        dtype = DTYPES[config.param_dtype]
        V, D = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (V, D), dtype), logical_axes=("vocab", "embed"))
        self.layers = DecoderStack(config, rngs)
        self.final_norm = nnx.Param(jnp.ones((D,), dtype), logical_axes=("norm",))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (D, V), dtype), logical_axes=("embed", "vocab")
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after the last RMSNorm) and the updated cache.

        tokens, positions: [B, T] int. segment_ids: [B, T] int, tokens attend only within their
        own segment; 0 marks padding. Without segment_ids and cache, attention is plain causal
        (right padding needs nothing more) and uses a fused kernel where the backend has one.
        With a cache, the T tokens are written at slots cache.index .. cache.index + T - 1 (per
        row when cache.index is [B]) and attend to every earlier slot.
        """
        c = self.config
        dtype = DTYPES[c.dtype]
        B, T = tokens.shape
        x = self.embed[...].astype(dtype)[tokens]
        write_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        mask = key_segments = None
        if cache is not None or segment_ids is not None:
            if segment_ids is None:
                segment_ids = jnp.ones((B, T), jnp.int32)
            key_segments = segment_ids
            if cache is not None:
                key_segments = write_at(cache.segment_ids, segment_ids.astype(jnp.int32), (0, 0), 1, write_index, batch_axis=0)
            mask = attention_mask(segment_ids, key_segments, write_index[..., None] + jnp.arange(T))

        def layer(carry, p):
            x, kv, l = carry
            x, kv = decoder_layer(x, p, positions, mask, None if kv is None else (*kv, l), write_index, c)
            return (x, kv, l + 1), None

        if REMAT_POLICIES[c.remat] is not None:
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[c.remat])
        kv = None if cache is None else (cache.k, cache.v)
        (x, kv, _), _ = jax.lax.scan(layer, (x, kv, jnp.zeros((), jnp.int32)), self.layers.arrays())
        hidden = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], segment_ids=key_segments, index=write_index + T)
        return hidden, cache

    def head(self) -> jax.Array:
        """The LM head as [D, V] (the transposed embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]. Use only on a few positions at a time."""
        return jnp.einsum("...d,dv->...v", hidden, self.head().astype(hidden.dtype), preferred_element_type=jnp.float32)


def logical_axes(state: nnx.State) -> Any:
    """The pytree of logical-axis tuples matching a model state (from the params' metadata)."""
    return jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(config: Qwen3Config) -> Qwen3:
    """A Qwen3 whose parameters are shape/dtype structs: no memory, no compute."""
    return nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))


def count_params(config: Qwen3Config) -> int:
    """Number of parameters, from abstract shapes."""
    _, state = nnx.split(abstract_model(config))
    return sum(int(x.size) for x in jax.tree.leaves(state))
