"""Pure JAX losses for HSD and the GRPO family (see shared/PAPER.md for every formula).

Shapes: ``B`` batch (rollouts), ``T`` response time, ``D`` model dim, ``V`` vocab, ``G`` group size.

Data flow inside the trainer's one jitted update step::

    ref_lp, _ = token_logprobs(ref_hidden, head, tokens)                   # no grad needed
    loss, metrics, out = chunked_objective(student_hidden, head, tokens,    # one student pass
                                           LossInputs(None, mask, ref_logprobs=ref_lp, advantages=...),
                                           cfg, teacher_hidden=teacher_hidden)

``chunked_objective`` is ``distill_divergence`` (or ``token_logprobs``) composed with ``objective``;
with ``cfg.fused_grad`` its gradient is computed in the forward pass, chunk by chunk.
``token_logprobs``, ``distill_divergence`` and ``chunked_objective`` never hold ``[B, T, V]``
logits: they scan over chunks of the flattened ``B*T`` positions (under ``jax.checkpoint``, or
with the gradient taken inside the chunk), so forward and backward hold ``O(chunk_size * V)``. Chunk ``i`` holds the strided positions ``i, i + n, i + 2n, ...`` (``n``
chunks), so a batch sharded over devices stays sharded inside every chunk. Logits are computed in
float32 and divided by the sampling temperature.

Gradient accumulation: every aggregated term is ``numerator / denominator``. Compute the
denominators once over the whole batch (``loss_denominators``) and pass them to ``objective`` for
each micro-batch; the micro-batch losses (and their gradients) then sum to the full-batch loss
exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
sg = jax.lax.stop_gradient

DIVERGENCES = ("kl", "reverse_kl", "jsd", "sampled")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
REF_KL_LEVELS = ("token", "sequence")
REF_KLS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
_LOG_RATIO_CLAMP = 20.0  # |log ratio| bound before exp, as in verl
_K3_MAX = 10.0  # k3 is clamped above at this value (zero gradient beyond)


# ----------------------------------------------------------------------------------------------
# Chunked logits
# ----------------------------------------------------------------------------------------------


def _logits(hidden: Array, head: Array, head_layout: str, temperature: float) -> Array:
    """``hidden [C, D]`` x ``head [D, V]`` (or ``[V, D]``) -> float32 ``[C, V]`` / temperature."""
    specs = {"dv": "cd,dv->cv", "vd": "cd,vd->cv"}
    if head_layout not in specs:
        raise ValueError(f"head_layout={head_layout!r}: use 'dv' for head [D, V], 'vd' for [V, D]")
    logits = jnp.einsum(specs[head_layout], hidden, head, preferred_element_type=jnp.float32)
    return logits / temperature


def _take(logp: Array, targets: Array) -> Array:
    """``logp [C, V]``, ``targets [C]`` -> ``logp[c, targets[c]]`` as ``[C]``."""
    return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def _entropy(logp: Array) -> Array:
    """Entropy ``[...]`` of log-probabilities ``[..., V]``."""
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _chunk_layout(b: int, t: int, chunk_size: int) -> tuple[Callable, Callable]:
    """``(to_chunks, from_chunks)`` for ``B*T`` positions in chunks of ``C = min(chunk_size, B*T)``.

    ``to_chunks``: ``[B, T, ...] -> [num_chunks, C, ...]`` (zero-padded); chunk ``i`` holds the
    strided positions ``i, i + n, i + 2n, ...`` (``n`` chunks). ``from_chunks`` inverts it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    n = b * t
    c = min(chunk_size, n)
    num_chunks = -(-n // c)

    def to_chunks(x):
        x = x.reshape(n, *x.shape[2:])
        x = jnp.pad(x, [(0, num_chunks * c - n)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(c, num_chunks, *x.shape[1:]).swapaxes(0, 1)

    def from_chunks(y):
        y = y.swapaxes(0, 1).reshape(num_chunks * c, *y.shape[2:])
        return y[:n].reshape(b, t, *y.shape[1:])

    return to_chunks, from_chunks


def _chunked(fn: Callable, head: Array, positional: tuple[Array, ...], chunk_size: int):
    """Map ``fn(head, *chunk) -> pytree of [C]`` over chunks of ``B*T`` positions.

    Each array in ``positional`` is ``[B, T, ...]``; the result is the same pytree with ``[B, T]``
    leaves. ``fn`` runs under ``jax.checkpoint``: only the chunk inputs are kept for the backward
    pass, which recomputes the ``[C, V]`` logits chunk by chunk.
    """
    to_chunks, from_chunks = _chunk_layout(*positional[0].shape[:2], chunk_size)
    body = jax.checkpoint(lambda xs: fn(head, *xs))
    out = jax.lax.map(body, tuple(to_chunks(x) for x in positional))
    return jax.tree.map(from_chunks, out)


def token_logprobs(
    hidden: Array,
    head: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    head_layout: str = "dv",
) -> tuple[Array, Array]:
    """Log-probs of ``targets`` and entropies under ``softmax(hidden @ head / temperature)``.

    Args:
      hidden: ``[B, T, D]`` final hidden states (after the final norm); ``hidden[b, t]`` predicts
        ``targets[b, t]``.
      head: LM head ``[D, V]`` (``head_layout="dv"``) or ``[V, D]`` (``"vd"``, tied embeddings).
      targets: ``[B, T]`` int token ids.
      temperature: sampling temperature (logits are divided by it).
      chunk_size: positions per chunk; memory is ``O(chunk_size * V)`` forward and backward.
    Returns:
      ``(logprobs [B, T] float32, differentiable; entropy [B, T] float32, no gradient)``.
    """

    chunk = lambda w, h, tgt: _logprob_chunk(w, h, tgt, temperature=temperature, head_layout=head_layout)
    return _chunked(chunk, head, (hidden, targets), chunk_size)


def _logprob_chunk(head: Array, hidden: Array, targets: Array, *, temperature: float,
                   head_layout: str) -> tuple[Array, Array]:
    """``token_logprobs`` of one chunk: ``hidden [C, D]``, ``targets [C]`` -> ``([C], [C])``."""
    return _logprobs_of_logits(_logits(hidden, head, head_layout, temperature), targets)


def _logprobs_of_logits(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``logits [C, V]``, ``targets [C]`` -> (log-probs of ``targets`` ``[C]``, entropy ``[C]``)."""
    logp = jax.nn.log_softmax(logits)
    return _take(logp, targets), sg(_entropy(logp))


# ----------------------------------------------------------------------------------------------
# Teacher-student divergences
# ----------------------------------------------------------------------------------------------


def _kl(logp: Array, logq: Array) -> Array:
    """``KL(p || q)`` over the last axis from log-probabilities."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _full_divergence(teacher_logp: Array, student_logp: Array, kind: str, alpha: float) -> Array:
    """Divergence over the last axis of log-probabilities ``[..., V]`` -> ``[...]``.

    ``kl``: KL(teacher || student) (HSD Eq. 13). ``reverse_kl``: KL(student || teacher).
    ``jsd``: generalised JSD ``(1 - alpha) KL(S || M) + alpha KL(T || M)`` with the mixture
    ``M = (1 - alpha) S + alpha T``; following trl's SDPO/GKD convention the endpoints are special
    cased: ``alpha = 0`` is KL(teacher || student) and ``alpha = 1`` is KL(student || teacher).
    """
    if kind == "kl" or (kind == "jsd" and alpha == 0.0):
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and alpha == 1.0):
        return _kl(student_logp, teacher_logp)
    mix = jnp.logaddexp(student_logp + jnp.log1p(-alpha), teacher_logp + jnp.log(alpha))
    return (1.0 - alpha) * _kl(student_logp, mix) + alpha * _kl(teacher_logp, mix)


def _with_tail(logp_topk: Array) -> Array:
    """``[C, K]`` top-k log-probs -> ``[C, K + 1]``: one extra bucket holds the remaining mass."""
    captured = jnp.minimum(jax.nn.logsumexp(logp_topk, axis=-1, keepdims=True), -1e-7)
    return jnp.concatenate([logp_topk, jnp.log(-jnp.expm1(captured))], axis=-1)


class DistillOutput(NamedTuple):
    """Per-position results of ``distill_divergence``, all ``[B, T]`` float32."""

    divergence: Array  # differentiable w.r.t. the student (and the head through the student)
    credit: Array  # log pT(o_t) - log pS(o_t), HSD Eq. 2; no gradient
    logprobs: Array  # student log pS(o_t); differentiable
    entropy: Array  # student entropy; no gradient


def distill_divergence(
    teacher_hidden: Array,
    student_hidden: Array,
    head: Array,
    targets: Array,
    *,
    divergence: str = "kl",
    alpha: float = 0.5,
    top_k: int | None = None,
    top_k_support: str = "student",
    temperature: float = 1.0,
    chunk_size: int = 128,
    head_layout: str = "dv",
    teacher_head: Array | None = None,
) -> DistillOutput:
    """Fused chunked teacher-student divergence, sampled-token credit and student logprobs.

    The teacher reads the same LM head (or ``teacher_head``, e.g. an EMA teacher's) under
    ``stop_gradient``: no gradient reaches ``teacher_hidden``, and the head's gradient comes only
    through the student.

    Args:
      teacher_hidden: ``[B, T, D]`` teacher final hidden states, aligned with the student:
        ``teacher_hidden[b, t]`` and ``student_hidden[b, t]`` both predict ``targets[b, t]``.
      student_hidden: ``[B, T, D]`` student final hidden states.
      head: ``[D, V]`` or ``[V, D]`` (see ``head_layout``) shared LM head.
      targets: ``[B, T]`` sampled tokens ``o_t``.
      divergence: ``"kl"`` KL(teacher || student) over the full vocabulary (HSD Eq. 13);
        ``"reverse_kl"`` KL(student || teacher); ``"jsd"`` generalised JSD with ``alpha``
        (``alpha=0`` -> KL(teacher || student), ``alpha=1`` -> KL(student || teacher), ``0.5``
        symmetric); ``"sampled"`` the one-sample estimator at ``o_t``: its value is
        ``delta = log pS(o_t) - log pT(o_t)`` (an unbiased estimate of KL(student || teacher)
        for ``o_t ~ student``) and its gradient is ``sg(delta) * grad log pS(o_t)``, i.e. the
        gradient of trl's ``sg(log pS - log pT) * log pS``.
      alpha: JSD coefficient in ``[0, 1]``.
      top_k: if set, the divergence is taken over the ``top_k`` tokens of the
        ``top_k_support`` side (``"student"``, SDPO's choice, or ``"teacher"``) plus one tail
        bucket holding the remaining probability mass of each distribution.
      temperature, chunk_size, head_layout: as in ``token_logprobs``.
      teacher_head: the teacher's own LM head (same layout), or None to share ``head``.
    Returns:
      ``DistillOutput`` of ``[B, T]`` arrays.
    """
    _check_divergence(divergence, alpha, top_k)
    if top_k_support not in ("student", "teacher"):
        raise ValueError(f"top_k_support={top_k_support!r}: use 'student' or 'teacher'")

    def chunk(w, th, sh, tgt):
        return _distill_chunk(w, w if teacher_head is None else teacher_head, th, sh, tgt,
                              divergence=divergence, alpha=alpha, top_k=top_k,
                              top_k_support=top_k_support, temperature=temperature,
                              head_layout=head_layout)

    return _chunked(chunk, head, (sg(teacher_hidden), student_hidden, targets), chunk_size)


def _distill_chunk(head: Array, teacher_head: Array, teacher_hidden: Array, student_hidden: Array,
                   targets: Array, *, divergence: str, alpha: float, top_k: int | None,
                   top_k_support: str, temperature: float, head_layout: str) -> DistillOutput:
    """``distill_divergence`` of one chunk of ``C`` positions (hidden ``[C, D]``, targets ``[C]``);
    the teacher's logits (from ``teacher_head``) are under ``stop_gradient``."""
    return _distill_of_logits(sg(_logits(teacher_hidden, teacher_head, head_layout, temperature)),
                              _logits(student_hidden, head, head_layout, temperature), targets,
                              divergence=divergence, alpha=alpha, top_k=top_k, top_k_support=top_k_support)


def _distill_of_logits(t_logits: Array, s_logits: Array, targets: Array, *, divergence: str, alpha: float,
                       top_k: int | None, top_k_support: str) -> DistillOutput:
    """``_distill_chunk`` from the chunk's teacher and student logits ``[C, V]`` (``targets [C]``)."""
    t_logp, s_logp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
    t_tok, s_tok = _take(t_logp, targets), _take(s_logp, targets)
    if divergence == "sampled":
        delta = sg(s_tok - t_tok)
        div = delta + delta * (s_tok - sg(s_tok))
    elif top_k is None:
        div = _full_divergence(t_logp, s_logp, divergence, alpha)
    else:
        support = t_logits if top_k_support == "teacher" else sg(s_logits)
        _, idx = jax.lax.top_k(support, top_k)
        topk = lambda lp: _with_tail(jnp.take_along_axis(lp, idx, axis=-1))
        div = _full_divergence(topk(t_logp), topk(s_logp), divergence, alpha)
    return DistillOutput(div, sg(t_tok - s_tok), s_tok, sg(_entropy(s_logp)))


def _check_divergence(divergence: str, alpha: float, top_k: int | None) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is unknown: use one of {DIVERGENCES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or None for the full vocabulary")
    if top_k is not None and divergence == "sampled":
        raise ValueError("top_k applies to full-distribution divergences; set top_k=None "
                         "with divergence='sampled'")


# ----------------------------------------------------------------------------------------------
# Advantages and reward shaping
# ----------------------------------------------------------------------------------------------


def _grouped(rewards: Array, group_size: int | None) -> Array:
    """``[num_groups, G]`` view of rewards given as ``[num_groups, G]`` or flat + ``group_size``."""
    if rewards.ndim == 2 and group_size in (None, rewards.shape[1]):
        return rewards
    if rewards.ndim == 1 and group_size and rewards.shape[0] % group_size == 0:
        return rewards.reshape(-1, group_size)
    raise ValueError(f"rewards of shape {rewards.shape} with group_size={group_size}: pass "
                     "[num_groups, G], or a flat [num_groups * G] array with group_size=G")


def group_advantages(
    rewards: Array, *, group_size: int | None = None, normalize_std: bool = True, eps: float = 1e-6
) -> Array:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)``, or ``r - mean_g`` (Dr. GRPO).

    ``std_g`` is the unbiased (ddof=1) group standard deviation, as in trl and verl.
    Args:
      rewards: ``[num_groups, G]``, or flat ``[num_groups * G]`` (group-major) with ``group_size``.
    Returns:
      advantages of the same shape as ``rewards``; they sum to zero within each group.
    """
    r = _grouped(rewards, group_size)
    if r.shape[1] < 2:
        raise ValueError(f"group size {r.shape[1]} < 2: group advantages need G >= 2 rollouts")
    adv = r - r.mean(axis=1, keepdims=True)
    if normalize_std:
        adv = adv / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(rewards.shape)


def nondegenerate_mask(rewards: Array, *, group_size: int | None = None) -> Array:
    """DAPO dynamic sampling: ``True`` for rollouts whose group rewards are not all equal.

    Groups whose rewards are all 0 or all 1 carry no group-relative signal; mask them out.
    ``rewards`` as in ``group_advantages``; returns a bool array of the same shape.
    """
    r = _grouped(rewards, group_size)
    keep = jnp.any(r != r[:, :1], axis=1, keepdims=True)
    return jnp.broadcast_to(keep, r.shape).reshape(rewards.shape)


def overlong_penalty(lengths: Array, *, max_length: int, buffer: int) -> Array:
    """DAPO soft overlong punishment, added to the reward.

    ``0`` for ``L <= max_length - buffer``, ``(max_length - buffer - L) / buffer`` inside the
    buffer, ``-1`` beyond ``max_length``. ``lengths [B]`` -> ``[B]`` float32.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer={buffer} must lie in (0, max_length={max_length}]")
    excess = lengths.astype(jnp.float32) - (max_length - buffer)
    return -jnp.clip(excess / buffer, 0.0, 1.0)


def rlsd_token_advantages(
    advantages: Array, credit: Array, *, lam: float, clip_low: float = 0.8, clip_high: float = 1.2
) -> Array:
    """RLSD token advantages ``A_t = A * ((1 - lam) + lam * w_t)``, no gradient.

    ``w_t = clip(exp(sign(A) * delta_t), clip_low, clip_high)`` with
    ``delta_t = sg(log pT - log pS)`` (the ``credit`` of ``distill_divergence``).
    ``advantages [B]`` (or ``[B, T]``), ``credit [B, T]`` -> ``[B, T]``.
    """
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    w = jnp.clip(jnp.exp(jnp.sign(adv) * sg(credit)), clip_low, clip_high)
    return sg(adv * ((1.0 - lam) + lam * w))


# ----------------------------------------------------------------------------------------------
# Policy gradient, reference KL, aggregation
# ----------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    ratio_level: str = "token",
) -> tuple[Array, dict[str, Array]]:
    """PPO-clipped policy-gradient loss per token (to be aggregated with ``aggregate``).

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``; with ``dual_clip = c > 1`` it is
    further capped at ``-A c`` where ``A < 0``. ``ratio_level="token"``: ``r_t = exp(logp_t -
    old_t)``. ``"sequence"`` (GSPO): ``r = exp(mean_t(logp - old))`` over the masked tokens of the
    row, applied to every token with gradient ``r * grad logp_t`` (GSPO-token form).

    Args:
      logprobs, old_logprobs: ``[B, T]`` current (differentiable) and sampler log-probabilities.
      advantages: ``[B]`` (per sequence) or ``[B, T]`` (per token).
      mask: ``[B, T]`` response mask (only used for the sequence-level ratio).
    Returns:
      ``(loss [B, T], {"ratio", "clipped", "dual_clipped"} each [B, T])``; ``clipped`` marks
      tokens whose clipped branch is active (zero gradient), ``dual_clipped`` those capped by the
      dual clip.
    """
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        mask = mask.astype(jnp.float32)
        tokens = jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
        seq = jnp.sum(log_ratio * mask, -1, keepdims=True) / tokens
        log_ratio = sg(seq) + logprobs - sg(logprobs)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level={ratio_level!r}: use one of {RATIO_LEVELS}")
    ratio = jnp.exp(jnp.clip(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    adv = sg(advantages if advantages.ndim == 2 else advantages[:, None])
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    info = {"ratio": sg(ratio), "clipped": clipped > unclipped}
    if dual_clip is None:
        info["dual_clipped"] = jnp.zeros_like(info["clipped"])
        return loss, info
    capped = (adv < 0) & (loss > -adv * dual_clip)
    info["dual_clipped"] = capped
    return jnp.where(capped, -adv * dual_clip, loss), info


def ref_kl(logprobs: Array, ref_logprobs: Array, kind: str = "k3") -> Array:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, ``[B, T]`` -> ``[B, T]``.

    With ``d = ref_logprobs - logprobs``: ``k1 = -d``, ``k2 = d^2 / 2``,
    ``k3 = exp(d) - d - 1`` (low variance; ``d`` clamped to +-20, result clamped to <= 10).
    """
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        d = jnp.clip(d, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.minimum(jnp.exp(d) - d - 1.0, _K3_MAX)
    raise ValueError(f"ref_kl kind={kind!r}: use one of {REF_KLS}")


def aggregation_weights(mask: Array, mode: str, *, norm_length: int | None = None) -> Array:
    """Per-token weights ``[B, T]`` of ``aggregate``'s numerator: ``numerator = sum(w * values)``.

    ``mask`` for ``token-mean`` and ``seq-mean-token-sum``; ``mask / row tokens`` for
    ``seq-mean-token-mean``; ``mask / norm_length`` (default ``T``) for ``seq-mean-token-sum-norm``.
    """
    mask = mask.astype(jnp.float32)
    if mode in ("token-mean", "seq-mean-token-sum"):
        return mask
    if mode == "seq-mean-token-mean":
        return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
    if mode == "seq-mean-token-sum-norm":
        return mask / (norm_length or mask.shape[-1])
    raise ValueError(f"aggregation mode={mode!r}: use one of {AGGREGATIONS}")


def aggregate(
    values: Array, mask: Array, mode: str, *, norm_length: int | None = None
) -> tuple[Array, Array]:
    """Masked aggregation of per-token ``values [B, T]`` as ``(numerator, denominator)`` scalars.

    The loss is ``numerator / denominator``; summing numerators and denominators over micro-batches
    (split along B) gives exactly the full-batch value. Rows with an all-zero mask count nowhere.
      ``token-mean``: ``sum(m v) / sum(m)`` (DAPO).
      ``seq-mean-token-mean``: mean over non-empty rows of the row's token mean (GRPO, HSD Eq. 10).
      ``seq-mean-token-sum``: mean over non-empty rows of the row's token sum (a sequence-level
      quantity, e.g. the sequence KL ``sum_t KL_t``).
      ``seq-mean-token-sum-norm``: mean over non-empty rows of ``sum_t(m v) / norm_length``
      (Dr. GRPO; ``norm_length`` a constant such as the max response length, default ``T``).
    """
    weights = aggregation_weights(mask, mode, norm_length=norm_length)
    row_tokens = mask.astype(jnp.float32).sum(-1)
    rows = jnp.sum(row_tokens > 0).astype(jnp.float32)
    return jnp.sum(weights * values), row_tokens.sum() if mode == "token-mean" else rows


# ----------------------------------------------------------------------------------------------
# The composed objective
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """``loss = w_pg * PG + w_sd * distillation + beta * ref_KL``; defaults are ``preset("hsd")``.

    Fields: term weights (``w_pg``, ``w_sd``, ``beta``, ``ref_kl`` estimator); ``agg`` the
    aggregation of every term, except the reference KL at ``ref_kl_level="sequence"``: the
    paper's "sequence-level penalty", ``sum_t`` of the per-token estimator averaged over sequences
    (``seq-mean-token-sum``), whose gradient scales with length, where "token" (default) averages
    it like the other terms; ``max_response_length`` the Dr. GRPO normaliser and DAPO's overlong
    limit; advantages (``normalize_std``, ``adv_eps``, ``drop_degenerate_groups`` (DAPO dynamic
    sampling), ``overlong_buffer`` (DAPO; 0 = off)); PPO (``eps_low``, ``eps_high``, ``dual_clip``,
    ``ratio_level`` ("sequence" = GSPO), ``rlsd_lambda`` (> 0 = RLSD token weights)); distillation
    (``divergence``, ``alpha``, ``top_k``, ``temperature``, ``chunk_size``; see
    ``distill_divergence``); ``teacher_ema``: 0 = the teacher is the current policy, r > 0 = an
    EMA of the policy's weights moved by r after each update (SDPO: 0.05); ``fused_grad``: the
    LM-head gradient is computed in the forward pass over chunks (``chunked_objective``; not with
    GSPO's sequence ratio), else by autodiff through rematerialised chunks.
    """

    w_pg: float = 0.0
    w_sd: float = 1.0
    beta: float = 1e-3
    ref_kl: str = "k3"
    ref_kl_level: str = "token"
    agg: str = "seq-mean-token-mean"
    max_response_length: int = 4096
    normalize_std: bool = True
    adv_eps: float = 1e-6
    drop_degenerate_groups: bool = False
    overlong_buffer: int = 0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    ratio_level: str = "token"
    rlsd_lambda: float = 0.0
    divergence: str = "kl"
    alpha: float = 0.5
    top_k: int | None = None
    temperature: float = 1.0
    chunk_size: int = 128
    teacher_ema: float = 0.0
    fused_grad: bool = True

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"LossConfig: {msg}")

        choices_of = {"ref_kl": REF_KLS, "ref_kl_level": REF_KL_LEVELS, "agg": AGGREGATIONS,
                      "ratio_level": RATIO_LEVELS}
        for name, choices in choices_of.items():
            value = getattr(self, name)
            need(value in choices, f"{name}={value!r} is unknown; set {name} to one of {choices}")
        for name in ("w_pg", "w_sd", "beta", "adv_eps", "overlong_buffer"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be >= 0")
        need(self.w_pg + self.w_sd > 0, "w_pg and w_sd are both 0; set w_pg > 0 (policy "
             "gradient) and/or w_sd > 0 (distillation)")
        need(0 < self.eps_low < 1, f"eps_low={self.eps_low} must lie in (0, 1)")
        need(self.eps_high > 0, f"eps_high={self.eps_high} must be > 0")
        need(self.dual_clip is None or self.dual_clip > 1,
             f"dual_clip={self.dual_clip} must be > 1, or None to disable it")
        need(0 <= self.rlsd_lambda <= 1, f"rlsd_lambda={self.rlsd_lambda} must lie in [0, 1]")
        need(self.rlsd_lambda == 0 or self.w_pg > 0, "rlsd_lambda > 0 reweights the policy "
             "gradient, which has w_pg=0; set w_pg > 0 or rlsd_lambda=0")
        need(self.max_response_length > 0, "max_response_length must be > 0")
        need(self.overlong_buffer <= self.max_response_length,
             f"overlong_buffer={self.overlong_buffer} exceeds max_response_length="
             f"{self.max_response_length}; lower overlong_buffer")
        need(self.temperature > 0, f"temperature={self.temperature} must be > 0")
        need(self.chunk_size >= 1, f"chunk_size={self.chunk_size} must be >= 1")
        need(0 <= self.teacher_ema < 1, f"teacher_ema={self.teacher_ema} must lie in [0, 1) (0 = no EMA teacher)")
        need(not (self.fused_grad and self.w_pg > 0 and self.ratio_level == "sequence"),
             "fused_grad=True computes each token's gradient in the forward pass, but "
             "ratio_level='sequence' (GSPO) needs all of a row's log-probs first; set fused_grad=False")
        try:
            _check_divergence(self.divergence, self.alpha, self.top_k)
        except ValueError as e:
            raise ValueError(f"LossConfig: {e}") from None

    @property
    def ref_agg(self) -> str:
        """The aggregation of the reference-KL term (``ref_kl_level``)."""
        return self.agg if self.ref_kl_level == "token" else "seq-mean-token-sum"

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads a teacher pass: distillation (``w_sd``) or RLSD token weights."""
        return self.w_sd > 0 or self.rlsd_lambda > 0


_PRESETS: dict[str, dict] = {
    # Eq. 10/13: full-vocab KL(teacher || student) over all G rollouts, k3 reference KL, no PG.
    "hsd": {},
    # trl's OPSD default: generalised JSD at alpha=0, i.e. KL(teacher || student). OPSD differs
    # from HSD in the teacher context (reference answer only), built in hindsight.py.
    "opsd": dict(divergence="jsd", alpha=0.0),
    # trl's SDPO defaults: JSD alpha=0.5 on the student's top-100 tokens plus a tail bucket; rows
    # without a successful peer are masked via LossInputs.distill_mask.
    # SDPO's scripts keep an EMA teacher (rate 0.05); demonstrations lose their <think> block
    # (the sdpo variant's hindsight.strip_think, validation.TEACHERS).
    "sdpo": dict(divergence="jsd", alpha=0.5, top_k=100, teacher_ema=0.05),
    "grpo": dict(w_pg=1.0, w_sd=0.0),
    "dr_grpo": dict(w_pg=1.0, w_sd=0.0, normalize_std=False, agg="seq-mean-token-sum-norm"),
    # DAPO's overlong buffer for a 4096 response limit is our choice (DAPO: 4096 of 20480).
    "dapo": dict(w_pg=1.0, w_sd=0.0, eps_high=0.28, agg="token-mean",
                 drop_degenerate_groups=True, overlong_buffer=1024),
    "gspo": dict(w_pg=1.0, w_sd=0.0, ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, fused_grad=False),
    "rlsd": dict(w_pg=1.0, w_sd=0.0, rlsd_lambda=0.5),
    "grpo_opsd": dict(w_pg=0.5, w_sd=0.5, divergence="jsd", alpha=0.0),
    # The fused objective: HSD's full-vocabulary distillation (peer + answer context) plus GRPO's
    # policy gradient, equally weighted by default (w_pg, w_sd are sweepable).
    "hsd_grpo": dict(w_pg=0.5, w_sd=0.5),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, **overrides) -> LossConfig:
    """The paper's settings for ``name`` in ``PRESETS``, with optional field overrides."""
    if name not in _PRESETS:
        raise ValueError(f"unknown loss preset {name!r}; use one of {PRESETS}")
    return LossConfig(**{**_PRESETS[name], **overrides})


def rollout_advantages(
    rewards: Array, lengths: Array, cfg: LossConfig, *, group_size: int | None = None
) -> tuple[Array, Array]:
    """Advantages and row keep-mask from verifier rewards, following ``cfg``.

    Applies DAPO overlong shaping (``cfg.overlong_buffer > 0``), group advantages, and DAPO's
    degenerate-group mask on the unshaped rewards (``cfg.drop_degenerate_groups``; else all True).
    ``rewards``, ``lengths``: ``[num_groups, G]`` or flat ``[B]`` with ``group_size``.
    Returns ``(advantages, keep)`` shaped like ``rewards``; fold ``keep`` into the response mask.
    """
    shaped = rewards.astype(jnp.float32)
    if cfg.overlong_buffer:
        shaped = shaped + overlong_penalty(lengths, max_length=cfg.max_response_length,
                                           buffer=cfg.overlong_buffer)
    adv = group_advantages(shaped, group_size=group_size, normalize_std=cfg.normalize_std,
                           eps=cfg.adv_eps)
    if cfg.drop_degenerate_groups:
        return adv, nondegenerate_mask(rewards, group_size=group_size)
    return adv, jnp.ones(rewards.shape, bool)


class LossInputs(NamedTuple):
    """Arrays for ``objective``; ``[B, T]`` unless noted. Optional fields may be None when the
    config does not use them."""

    logprobs: Array  # student log pS(o_t), differentiable
    mask: Array  # response mask (fold DAPO's keep mask in here)
    old_logprobs: Array | None = None  # sampler log-probs (needed when w_pg > 0)
    ref_logprobs: Array | None = None  # reference-model log-probs (needed when beta > 0)
    advantages: Array | None = None  # [B] or [B, T] (needed when w_pg > 0)
    divergence: Array | None = None  # per-position divergence (needed when w_sd > 0)
    distill_mask: Array | None = None  # [B] rows with a teacher signal (SDPO); default all
    credit: Array | None = None  # log pT - log pS (needed when rlsd_lambda > 0; metrics)
    entropy: Array | None = None  # student entropy (metrics)


def _require(inputs: LossInputs, field: str, why: str) -> Array:
    value = getattr(inputs, field)
    if value is None:
        raise ValueError(f"LossInputs.{field} is None but {why}; pass {field}")
    return value


def _distill_token_mask(mask: Array, distill_mask: Array | None) -> Array:
    """``mask`` [B, T] restricted to the rows of ``distill_mask`` [B] (None = every row), float32."""
    mask = mask.astype(jnp.float32)
    if distill_mask is None:
        return mask
    return mask * distill_mask.astype(jnp.float32)[:, None]


def loss_denominators(mask: Array, distill_mask: Array | None, cfg: LossConfig) -> dict[str, Array]:
    """Aggregation denominators ``{"main", "distill", "ref"}`` of a (full) batch, for ``objective``.

    ``mask``: [B, T] response mask (as ``LossInputs.mask``); ``distill_mask``: [B] rows with a
    teacher signal, or None for every row (as ``LossInputs.distill_mask``).
    """
    zeros = jnp.zeros(mask.shape, jnp.float32)
    norm = cfg.max_response_length
    return {"main": aggregate(zeros, mask, cfg.agg, norm_length=norm)[1],
            "distill": aggregate(zeros, _distill_token_mask(mask, distill_mask), cfg.agg,
                                 norm_length=norm)[1],
            "ref": aggregate(zeros, mask, cfg.ref_agg, norm_length=norm)[1]}


# The weighted terms of the objective: metric name -> LossConfig field of its weight.
_TERMS = {"pg_loss": "w_pg", "distill_loss": "w_sd", "ref_kl": "beta"}


def token_weights(mask: Array, distill_mask: Array | None, cfg: LossConfig,
                  denominators: dict[str, Array]) -> dict[str, Array]:
    """Per-token weights ``[B, T]`` of each term of ``_TERMS``: ``term = sum(weight * values)``.

    The aggregation weights (``aggregation_weights``) of ``cfg.agg`` (``cfg.ref_agg`` for the
    reference KL) over ``mask`` (``mask * distill_mask`` for distillation), divided by the term's
    denominator (``loss_denominators``). Known before any logit is computed.
    """
    def weights(m, den, agg=cfg.agg):
        return aggregation_weights(m, agg, norm_length=cfg.max_response_length) / jnp.maximum(den, 1.0)

    dens = denominators
    return {"pg_loss": weights(mask, dens["main"]),
            "distill_loss": weights(_distill_token_mask(mask, distill_mask), dens["distill"]),
            "ref_kl": weights(mask, dens["ref"], cfg.ref_agg)}


def _token_values(inputs: LossInputs, cfg: LossConfig) -> tuple[dict[str, Array], dict[str, Array]]:
    """Per-token values ``[B, T]`` of the active terms (keys of ``_TERMS``) and the PPO info.

    With ``cfg.ratio_level="token"`` every value depends only on its own position's inputs.
    """
    values, info = {}, {}
    if cfg.w_pg > 0:
        adv = _require(inputs, "advantages", "w_pg > 0")
        old = _require(inputs, "old_logprobs", "w_pg > 0")
        if cfg.rlsd_lambda > 0:
            credit = _require(inputs, "credit", "rlsd_lambda > 0")
            adv = rlsd_token_advantages(adv, credit, lam=cfg.rlsd_lambda)
        values["pg_loss"], info = policy_loss(
            inputs.logprobs, old, adv, inputs.mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
            dual_clip=cfg.dual_clip, ratio_level=cfg.ratio_level)
    if cfg.w_sd > 0:
        values["distill_loss"] = _require(inputs, "divergence", "w_sd > 0")
    if cfg.beta > 0:
        ref = _require(inputs, "ref_logprobs", "beta > 0")
        values["ref_kl"] = ref_kl(inputs.logprobs, ref, cfg.ref_kl)
    return values, info


def objective(
    inputs: LossInputs, cfg: LossConfig, *, denominators: dict[str, Array] | None = None
) -> tuple[Array, dict[str, Array]]:
    """``w_pg * PG + w_sd * distillation + beta * ref_KL`` and metrics.

    PG and the reference KL are aggregated over ``mask``, distillation over
    ``mask * distill_mask``, all with ``cfg.agg``. ``denominators`` (from ``loss_denominators``
    on the whole batch) make micro-batch losses sum to the full-batch loss; by default the
    batch's own.
    Returns ``(loss, metrics)``; ``metrics`` holds the weighted-term values ``pg_loss``,
    ``distill_loss``, ``ref_kl`` (additive over micro-batches like the loss) and masked token means
    ``clip_frac``, ``dual_clip_frac``, ``ratio``, ``kl`` (k3), ``divergence``, ``entropy``,
    ``credit``, ``abs_credit`` of the micro-batch (where the inputs are present).
    """
    dens = denominators
    if dens is None:
        dens = loss_denominators(inputs.mask, inputs.distill_mask, cfg)
    mask = inputs.mask.astype(jnp.float32)

    def token_mean(values, m=mask):
        return jnp.sum(values * m) / jnp.maximum(m.sum(), 1.0)

    weights = token_weights(inputs.mask, inputs.distill_mask, cfg, dens)
    values, info = _token_values(inputs, cfg)
    zero = jnp.zeros((), jnp.float32)
    metrics = {name: jnp.sum(weights[name] * values[name]) if name in values else zero for name in _TERMS}
    if info:
        metrics.update(clip_frac=token_mean(info["clipped"]), ratio=token_mean(info["ratio"]),
                       dual_clip_frac=token_mean(info["dual_clipped"]))
    if "distill_loss" in values:
        sd_mask = _distill_token_mask(inputs.mask, inputs.distill_mask)
        metrics["divergence"] = token_mean(values["distill_loss"], sd_mask)
    if "ref_kl" in values:
        metrics["kl"] = token_mean(values["ref_kl"])
    if inputs.entropy is not None:
        metrics["entropy"] = token_mean(inputs.entropy)
    if inputs.credit is not None:
        metrics["credit"] = token_mean(inputs.credit)
        metrics["abs_credit"] = token_mean(jnp.abs(inputs.credit))

    loss = sum(getattr(cfg, weight) * metrics[name] for name, weight in _TERMS.items())
    metrics = {k: sg(v) for k, v in metrics.items()}
    metrics["loss"] = sg(loss)
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# The objective over the LM head's outputs: autodiff or gradient-in-the-forward
# ----------------------------------------------------------------------------------------------


def chunked_objective(
    student_hidden: Array,
    head: Array,
    targets: Array,
    inputs: LossInputs,
    cfg: LossConfig,
    *,
    teacher_hidden: Array | None = None,
    teacher_head: Array | None = None,
    denominators: dict[str, Array] | None = None,
    head_layout: str = "dv",
) -> tuple[Array, dict[str, Array], DistillOutput]:
    """``objective`` of the student (and teacher) outputs at every response position, in chunks.

    One pass over chunks of ``cfg.chunk_size`` positions computes the student log-probs, entropy
    and, when ``cfg.needs_teacher``, the divergence and credit (``distill_divergence``; the
    teacher reads ``teacher_head``, default ``head``, under ``stop_gradient``). The gradient
    (w.r.t. ``student_hidden`` and ``head``) is:
      ``cfg.fused_grad=False``: autodiff through the chunks, whose backward recomputes each
      chunk's teacher and student logits (6 LM-head matmuls a position with a teacher, 4 without);
      ``cfg.fused_grad=True``: computed in the forward pass while each chunk's logits are live,
      from the per-position weights of every term known beforehand (``token_weights``, masks,
      advantages, old and reference log-probs), as a ``jax.custom_vjp`` (4 matmuls with a
      teacher, 3 without: naive full-logit autodiff's count). Needs ``cfg.ratio_level="token"``
      or ``w_pg=0``: GSPO's sequence ratio needs a row's every log-prob before any gradient.
    Both give the same loss, metrics and gradients up to float rounding.

    Args:
      student_hidden: ``[B, T, D]`` student final hidden states; ``[b, t]`` predicts
        ``targets [B, T]``.
      head: LM head ``[D, V]`` or ``[V, D]`` (``head_layout``).
      inputs: ``LossInputs`` without the outputs of this pass (``logprobs``, ``divergence``,
        ``credit``, ``entropy``: leave them None). ``old_logprobs=None`` with ``w_pg > 0``
        means the current policy's own (ratio 1: one optimizer step per batch).
      teacher_hidden: ``[B, T, D]``, needed when ``cfg.needs_teacher``.
      denominators: ``loss_denominators`` of the whole batch (default: this batch's).
    Returns:
      ``(loss, metrics, outputs)``: ``objective``'s loss and metrics; ``outputs`` the
      ``DistillOutput`` of the pass under ``stop_gradient`` (``divergence`` and ``credit`` None
      without a teacher).
    """
    if cfg.needs_teacher and teacher_hidden is None:
        raise ValueError("chunked_objective: the loss reads a teacher (w_sd > 0 or rlsd_lambda > 0) "
                         "but teacher_hidden is None; pass teacher_hidden")
    if denominators is None:
        denominators = loss_denominators(inputs.mask, inputs.distill_mask, cfg)
    if cfg.fused_grad:
        positions = _fused_positions(inputs, targets, teacher_hidden, cfg, denominators)
        fused_loss, outputs = _fused_loss(cfg, head_layout, student_hidden, head, teacher_head, positions)
        outputs = sg(outputs)
    else:
        outputs = _autodiff_outputs(student_hidden, head, targets, teacher_hidden, teacher_head, cfg,
                                    head_layout)
    old = inputs.old_logprobs if inputs.old_logprobs is not None else sg(outputs.logprobs)
    inputs = inputs._replace(logprobs=outputs.logprobs, old_logprobs=old, divergence=outputs.divergence,
                             credit=outputs.credit, entropy=outputs.entropy)
    loss, metrics = objective(inputs, cfg, denominators=denominators)
    if cfg.fused_grad:
        loss = fused_loss
        metrics["loss"] = sg(loss)
    return loss, metrics, sg(outputs)


def _autodiff_outputs(student_hidden, head, targets, teacher_hidden, teacher_head, cfg: LossConfig,
                      head_layout: str) -> DistillOutput:
    """The pass's per-position outputs, differentiable by autodiff (rematerialised chunks)."""
    chunked = dict(temperature=cfg.temperature, chunk_size=cfg.chunk_size, head_layout=head_layout)
    if cfg.needs_teacher:
        return distill_divergence(teacher_hidden, student_hidden, head, targets, divergence=cfg.divergence,
                                  alpha=cfg.alpha, top_k=cfg.top_k, teacher_head=teacher_head, **chunked)
    logprobs, entropy = token_logprobs(student_hidden, head, targets, **chunked)
    return DistillOutput(None, None, logprobs, entropy)


def _fused_positions(inputs: LossInputs, targets: Array, teacher_hidden: Array | None, cfg: LossConfig,
                     denominators: dict[str, Array]) -> dict[str, Array]:
    """The ``[B, T, ...]`` per-position inputs of the fused pass (None where unused)."""
    adv = inputs.advantages
    if adv is not None and adv.ndim == 1:
        adv = jnp.broadcast_to(adv[:, None], inputs.mask.shape)
    teacher = sg(teacher_hidden) if cfg.needs_teacher else None
    return {"targets": targets, "teacher_hidden": teacher,
            "mask": inputs.mask, "old_logprobs": inputs.old_logprobs, "ref_logprobs": inputs.ref_logprobs,
            "advantages": adv, "weights": token_weights(inputs.mask, inputs.distill_mask, cfg, denominators)}


def _vocab_blocks(c: int, d: int, v: int) -> int:
    """Vocabulary blocks of ``_add_head_grad`` for chunks of ``c`` positions: on CPU
    ``ceil(D / C)`` (each block's product the size of the chunk's logits), elsewhere 1."""
    return min(v, -(-d // c)) if jax.default_backend() == "cpu" else 1


def _add_head_grad(d_head: Array, head: Array, hidden: Array, d_logits: Array, head_layout: str,
                   temperature: float) -> Array:
    """``d_head`` (float32, the head's shape) plus the gradient w.r.t. ``head`` through ``_logits``,
    from ``hidden [C, D]`` and the logits' cotangent ``d_logits [C, V]``.

    On CPU, a loop over vocabulary blocks of ``K = ceil(V / ceil(D / C))`` columns adds each
    block's product into ``d_head`` in place: besides ``d_head`` it holds one ``[D, K]`` block
    (the size of ``d_logits``), not the ``[D, V]`` temporary XLA:CPU makes of one product. The
    last block is shifted to end at ``V``; its columns that an earlier block covered get a zero
    cotangent. Each entry is the same ``C``-term dot product as unblocked. Elsewhere one product
    is added (accelerator compilers can accumulate a matmul into its addend, not measured here),
    since slices at moving offsets of a vocabulary split over devices (tensor parallelism) would
    gather the whole gradient onto every device.
    """
    (c, d), v = hidden.shape, d_logits.shape[1]
    block = -(-v // _vocab_blocks(c, d, v))
    axis = head_layout.index("v")
    block_shape = jax.ShapeDtypeStruct(head.shape[:axis] + (block,) + head.shape[axis + 1:], head.dtype)
    transpose = jax.linear_transpose(lambda w: _logits(hidden, w, head_layout, temperature), block_shape)
    if block == v:
        (g,) = transpose(d_logits)
        return d_head + g.astype(jnp.float32)

    def add_block(i, d_head):
        first = jnp.minimum(i * block, v - block)  # the start of the block's columns, shifted into [0, V)
        fresh = first + jnp.arange(block) >= i * block  # False: added by the previous block
        (g,) = transpose(jnp.where(fresh, jax.lax.dynamic_slice_in_dim(d_logits, first, block, axis=1), 0.0))
        summed = jax.lax.dynamic_slice_in_dim(d_head, first, block, axis=axis) + g.astype(jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(d_head, summed, first, axis=axis)

    return jax.lax.fori_loop(0, -(-v // block), add_block, d_head)


def _fused_value_and_grad(cfg: LossConfig, head_layout: str, student_hidden: Array, head: Array,
                          teacher_head: Array | None, positions: dict[str, Array]):
    """``((loss, outputs), (d loss / d student_hidden, d loss / d head))`` in one chunked pass.

    Every chunk computes its outputs from its student logits with ``jax.vjp``, the per-position
    loss of those outputs (``_token_values`` times ``token_weights``: a function of the chunk's own
    positions only) and its cotangents, and pulls them back to the logits while they are live, then
    through the LM head to the hidden states and the head. The head's gradient accumulates over
    chunks in float32, in place (``_add_head_grad``; cast to the head's dtype at the end).
    """
    to_chunks, from_chunks = _chunk_layout(*student_hidden.shape[:2], cfg.chunk_size)
    logits = lambda h, w: _logits(h, w, head_layout, cfg.temperature)

    def outputs_of(s_logits, pos):
        if pos["teacher_hidden"] is None:
            return DistillOutput(None, None, *_logprobs_of_logits(s_logits, pos["targets"]))
        t_logits = sg(logits(pos["teacher_hidden"], head if teacher_head is None else teacher_head))
        return _distill_of_logits(t_logits, s_logits, pos["targets"], divergence=cfg.divergence, alpha=cfg.alpha,
                                  top_k=cfg.top_k, top_k_support="student")

    def position_loss(out: DistillOutput, pos):
        row = lambda x: None if x is None else x[None]  # [C] -> [1, C]: one row of C tokens
        old = pos["old_logprobs"] if pos["old_logprobs"] is not None else sg(out.logprobs)
        inputs = LossInputs(logprobs=row(out.logprobs), mask=row(pos["mask"]), old_logprobs=row(old),
                            ref_logprobs=row(pos["ref_logprobs"]), advantages=row(pos["advantages"]),
                            divergence=row(out.divergence), credit=row(out.credit))
        values, _ = _token_values(inputs, cfg)
        return sum(getattr(cfg, _TERMS[name]) * jnp.sum(pos["weights"][name] * v[0]) for name, v in values.items())

    # [C, num_chunks, ...] views of the padded positions (a reshape, no transpose): chunk i is
    # column i, read and written in place by the loop.
    columns = lambda x: to_chunks(x).swapaxes(0, 1)
    hidden, positions = columns(student_hidden), jax.tree.map(columns, positions)

    def chunk(carry, i):
        d_head, d_hidden = carry
        column = lambda x: jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)
        h, pos = column(hidden), jax.tree.map(column, positions)
        s_logits, pull_hidden = jax.vjp(lambda h: logits(h, head), h)
        out, pull_logits = jax.vjp(lambda z: outputs_of(z, pos), s_logits)
        loss, cotangents = jax.value_and_grad(position_loss)(out, pos)
        (d_logits,) = pull_logits(cotangents)
        (g_hidden,) = pull_hidden(d_logits)
        d_head = _add_head_grad(d_head, head, h, d_logits, head_layout, cfg.temperature)
        return (d_head, jax.lax.dynamic_update_index_in_dim(d_hidden, g_hidden, i, axis=1)), (loss, out)

    carry = jnp.zeros(head.shape, jnp.float32), jnp.zeros(hidden.shape, student_hidden.dtype)
    (d_head, d_hidden), (loss, out) = jax.lax.scan(chunk, carry, jnp.arange(hidden.shape[1]))
    d_hidden = d_hidden.swapaxes(0, 1)
    return (loss.sum(), jax.tree.map(from_chunks, out)), (from_chunks(d_hidden), d_head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_loss(cfg, head_layout, student_hidden, head, teacher_head, positions):
    """``(loss, outputs)`` of ``_fused_value_and_grad``, differentiable (only the loss) w.r.t.
    ``student_hidden`` and ``head``; the outputs' cotangents are ignored (use them under
    ``stop_gradient``), as are those of ``teacher_head`` and ``positions``."""
    return _fused_value_and_grad(cfg, head_layout, student_hidden, head, teacher_head, positions)[0]


def _fused_loss_fwd(cfg, head_layout, student_hidden, head, teacher_head, positions):
    value, (d_hidden, d_head) = _fused_value_and_grad(cfg, head_layout, student_hidden, head, teacher_head,
                                                      positions)
    return value, (d_hidden, d_head.astype(head.dtype))


def _fused_loss_bwd(cfg, head_layout, residuals, cotangents):
    del cfg, head_layout
    g = cotangents[0]  # the loss's; the outputs' are ignored
    return *(jax.tree.map(lambda d: (g * d).astype(d.dtype), residuals)), None, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
