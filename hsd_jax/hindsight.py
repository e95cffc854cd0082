"""Hindsight contexts (PAPER.md Eq. 9-12): peers, teacher/student batches, credit diagnostics.

Host-side NumPy (runs outside jit) except `gather_positions` and `token_credit`, which are jnp.

Layout. A batch holds `N` questions with `G` rollouts each, group-major: rollout `b = g * G + i`
is rollout `i` of question `g`; `B = N * G`. Everything is in token space:

    student row b:  [user_open ; q_g ; user_close ; assistant_open]                          ; o_b
    teacher row b:  [user_open ; q_g ; answer? ; demonstration? ; context_close ; user_close ;
                     assistant_open]                                                          ; o_b

where `answer? = answer_open ; a*_g ; answer_close` and `demonstration? = demo_open ; d_b ;
demo_close`, `d_b` being the peer rollout (modes `peer`, `peer_answer`) or the reference solution
(mode `solution`). The template pieces are text, encoded once per batch by `encode_template`;
question/answer/solution strings go through `encode_texts`. Note that encoding pieces separately
can split tokens differently from encoding the joined string; student and teacher use the same
convention, so the sampler must draw rollouts from `student_prompt(template, q)`.

Alignment. In both batches the hidden state at `gather_index[b, t] = response_start[b] - 1 + t`
predicts response token `o_b[t]`, so `gather_positions(hidden, gather_index)` gives `[B, T_resp, D]`
student and teacher states at the same response positions, ready for `losses.token_logprobs` and
`losses.distill_divergence` with targets `StudentBatch.response_tokens`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PEER_RULES = ("uniform", "first", "shortest", "lowest_ppl", "highest_ppl")
CONTEXT_MODES = ("none", "answer", "solution", "peer", "peer_answer")
WINDOWS = (2, 4, 8, 16, 32)
Tokens = Sequence[int] | np.ndarray


class Tokenizer(Protocol):
    """Anything with `encode(text) -> list[int]`; a HF tokenizer works as is (Qwen adds no BOS)."""

    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------------------------
# Peer selection (Eq. 9)
# ----------------------------------------------------------------------------------------------


def select_peers(
    rewards: np.ndarray,
    rule: str = "uniform",
    *,
    rng: np.random.Generator | int | None = None,
    lengths: np.ndarray | None = None,
    mean_logprobs: np.ndarray | None = None,
    success_at: float = 1.0,
) -> np.ndarray:
    """A successful peer for every rollout of each group, never the rollout itself.

    Args:
      rewards: `[G]` or `[N, G]`; rollout j succeeds when `rewards[..., j] >= success_at`.
      rule: `uniform` (HSD: uniform over S_i), `first` (SDPO: lowest index in S_i), `shortest`
        (fewest tokens, needs `lengths`), `lowest_ppl` / `highest_ppl` (needs `mean_logprobs`, the
        per-rollout mean token logprob under the current policy; perplexity = exp(-mean)).
        Deterministic rules break ties by the lowest index.
      rng: a `np.random.Generator` or an int seed; required by `uniform`.
      lengths, mean_logprobs: same shape as `rewards`.
    Returns:
      int32 array shaped like `rewards`: the within-group index of the peer, -1 when
      S_i = {j != i : R_j succeeds} is empty.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim not in (1, 2) or rewards.shape[-1] < 1:
        raise ValueError(f"rewards has shape {rewards.shape}: pass [G] or [num_groups, G].")
    if rule not in PEER_RULES:
        raise ValueError(f"Unknown peer rule {rule!r}: use one of {PEER_RULES}.")
    grouped = rewards.reshape(-1, rewards.shape[-1])
    N, G = grouped.shape
    success = grouped >= success_at
    candidates = success[:, None, :] & ~np.eye(G, dtype=bool)[None]  # [N, i, j]: j is a peer of i
    if rule == "uniform":
        if rng is None:
            raise ValueError("select_peers(rule='uniform') needs rng: pass a np.random.Generator or an int seed.")
        score = np.random.default_rng(rng).random((N, G, G))  # argmin of iid keys = uniform choice
    elif rule == "first":
        score = np.broadcast_to(np.arange(G, dtype=np.float64), (N, G, G))
    else:
        name = "lengths" if rule == "shortest" else "mean_logprobs"
        values = lengths if rule == "shortest" else mean_logprobs
        if values is None:
            raise ValueError(f"select_peers(rule={rule!r}) needs {name} shaped like rewards {rewards.shape}.")
        values = np.asarray(values, np.float64)
        if values.shape != rewards.shape or not np.all(np.isfinite(values)):
            raise ValueError(f"{name} must be finite with shape {rewards.shape} (rewards), got {values.shape}.")
        sign = -1.0 if rule == "lowest_ppl" else 1.0  # lowest perplexity = highest mean logprob
        score = np.broadcast_to(sign * values.reshape(N, 1, G), (N, G, G))
    peers = np.argmin(np.where(candidates, score, np.inf), axis=-1)
    peers = np.where(candidates.any(axis=-1), peers, -1).astype(np.int32)
    return peers.reshape(rewards.shape)


def flat_peer_index(peers: np.ndarray) -> np.ndarray:
    """Within-group peers `[N, G]` -> indices into the group-major flat batch `[N * G]` (-1 kept)."""
    peers = np.asarray(peers)
    if peers.ndim != 2:
        raise ValueError(f"peers has shape {peers.shape}: pass the [num_groups, G] output of select_peers.")
    N, G = peers.shape
    flat = np.arange(N)[:, None] * G + peers
    return np.where(peers >= 0, flat, -1).reshape(-1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Template and tokens
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherTemplate:
    """Text pieces of the student and teacher prompts (default: Qwen3's chat format).

    The privileged context goes inside the user turn, after the question: the reference answer,
    then the demonstration, each between delimiters, then `context_close` (only when a context is
    present). `stop_texts` are stripped from the end of a demonstration (a peer's `<|im_end|>`
    would otherwise close the user turn); `think_open`/`think_close` delimit the reasoning block
    removed by `strip_think`.
    """

    user_open: str = "<|im_start|>user\n"
    user_close: str = "<|im_end|>\n"
    assistant_open: str = "<|im_start|>assistant\n"
    answer_open: str = "\n\nHere is a reference answer:\n<reference_answer>\n"
    answer_close: str = "\n</reference_answer>"
    demo_open: str = "\n\nHere is a successful solution:\n<successful_solution>\n"
    demo_close: str = "\n</successful_solution>"
    context_close: str = "\n\nUse this only as guidance and solve the problem yourself."
    think_open: str = "<think>"
    think_close: str = "</think>"
    stop_texts: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class TemplateTokens:
    """`TeacherTemplate` with every piece encoded (int32 arrays); `stops` is a tuple of arrays."""

    user_open: np.ndarray
    user_close: np.ndarray
    assistant_open: np.ndarray
    answer_open: np.ndarray
    answer_close: np.ndarray
    demo_open: np.ndarray
    demo_close: np.ndarray
    context_close: np.ndarray
    think_open: np.ndarray
    think_close: np.ndarray
    stops: tuple[np.ndarray, ...]


def _ids(tokens: Tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32).reshape(-1)


def encode_template(tokenizer: Tokenizer, template: TeacherTemplate = TeacherTemplate()) -> TemplateTokens:
    """Encodes every piece of `template` once (call once per batch, or once per run)."""
    pieces = {f.name: getattr(template, f.name) for f in dataclasses.fields(template) if f.name != "stop_texts"}
    encoded = {name: _ids(tokenizer.encode(text)) if text else _ids([]) for name, text in pieces.items()}
    for name in ("think_open", "think_close"):
        if not len(encoded[name]):
            raise ValueError(f"TeacherTemplate.{name} encodes to no tokens: give the tag text (e.g. '<think>').")
    stops = tuple(_ids(tokenizer.encode(s)) for s in template.stop_texts if s)
    return TemplateTokens(**encoded, stops=stops)


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str | None]) -> list[np.ndarray | None]:
    """Encodes each distinct string once; `None` (e.g. a row without a reference solution) stays None."""
    cache: dict[str, np.ndarray] = {}
    for text in texts:
        if text is not None and text not in cache:
            cache[text] = _ids(tokenizer.encode(text))
    return [None if text is None else cache[text] for text in texts]


def student_prompt(template: TemplateTokens, question: Tokens) -> np.ndarray:
    """`[user_open ; q ; user_close ; assistant_open]`: the prompt the sampler must condition on."""
    return np.concatenate([template.user_open, _ids(question), template.user_close, template.assistant_open])


def _find(tokens: np.ndarray, pattern: np.ndarray, start: int = 0) -> int:
    """First index >= start where `pattern` occurs in `tokens`, or -1."""
    n = len(pattern)
    for k in start + np.flatnonzero(tokens[start : len(tokens) - n + 1] == pattern[0]):
        if np.array_equal(tokens[k : k + n], pattern):
            return int(k)
    return -1


def strip_think(tokens: Tokens, think_open: np.ndarray, think_close: np.ndarray) -> np.ndarray:
    """Removes the first `<think> ... </think>` block (tags included).

    A closing tag without an opening one (the opening tag was in the prompt) removes everything up
    to and including it; an unclosed block removes everything from the opening tag on.
    """
    tokens = _ids(tokens)
    close = _find(tokens, think_close)
    open_ = _find(tokens, think_open)
    if close >= 0:
        start = open_ if 0 <= open_ < close else 0
        return np.concatenate([tokens[:start], tokens[close + len(think_close) :]])
    return tokens[:open_] if open_ >= 0 else tokens


def strip_stops(tokens: Tokens, stops: Sequence[np.ndarray]) -> np.ndarray:
    """Removes trailing stop sequences (e.g. a final `<|im_end|>`), repeatedly."""
    tokens = _ids(tokens)
    stripped = True
    while stripped:
        stripped = False
        for stop in stops:
            if len(stop) and len(tokens) >= len(stop) and np.array_equal(tokens[len(tokens) - len(stop) :], stop):
                tokens, stripped = tokens[: len(tokens) - len(stop)], True
    return tokens


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


class TooLong(ValueError):
    """A sequence longer than the largest padding bucket."""


def bucket_length(n: int, buckets: int | Sequence[int]) -> int:
    """Padded length for `n` tokens: the next multiple of `buckets` (an int), or the smallest entry
    of `buckets` (a sequence, e.g. powers of two) that is >= n. At least 1."""
    n = max(int(n), 1)
    if isinstance(buckets, int):
        if buckets < 1:
            raise ValueError(f"buckets={buckets}: give a positive multiple or a sequence of lengths.")
        return -(-n // buckets) * buckets
    fitting = [b for b in buckets if b >= n]
    if not fitting:
        raise TooLong(f"{n} tokens exceed the largest bucket {max(buckets, default=0)}: add a larger bucket.")
    return min(fitting)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StudentBatch:
    """Student inputs `[q ; o]`, right padded; all int32 unless noted.

    tokens, positions, segment_ids: [B, T] model inputs (segment 0 = padding, positions restart per row).
    response_start: [B] index of the first response token in `tokens`.
    gather_index: [B, T_resp] = response_start - 1 + t (0 where t >= length): hidden there predicts o[t].
    response_tokens: [B, T_resp] the rollout tokens (targets), 0-padded.
    response_mask: [B, T_resp] float32, 1 on real response tokens.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    response_start: np.ndarray
    gather_index: np.ndarray
    response_tokens: np.ndarray
    response_mask: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TeacherBatch:
    """Teacher inputs `[q ; c ; o]`, right padded, aligned with the `StudentBatch` of the same rollouts.

    tokens, positions, segment_ids, response_start, gather_index: as in `StudentBatch`.
    distill_mask: [B] float32, 1 where the row is distilled (0 for mode `none` and for `peer`
      rows without a peer).
    has_peer: [B] bool, the row has a successful peer (from `peer_index`, whatever the mode).
    demo_tokens_dropped: [B] int32, demonstration tokens cut to fit `max_len`.
    """

    tokens: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    response_start: np.ndarray
    gather_index: np.ndarray
    distill_mask: np.ndarray
    has_peer: np.ndarray
    demo_tokens_dropped: np.ndarray

    @property
    def num_truncated(self) -> int:
        """Rows whose demonstration was truncated."""
        return int(np.count_nonzero(self.demo_tokens_dropped))


def _pack(
    prefixes: Sequence[np.ndarray], rollouts: Sequence[np.ndarray], buckets: int | Sequence[int]
) -> tuple[np.ndarray, ...]:
    """Right-pads `[prefix_b ; rollout_b]` rows. Returns tokens, positions, segment_ids [B, T],
    response_start [B], gather_index, response_tokens, response_mask [B, T_resp]."""
    B = len(rollouts)
    if any(len(p) == 0 for p in prefixes):
        raise ValueError("A prompt encodes to no tokens: TeacherTemplate.user_open/assistant_open must be non-empty.")
    lengths = np.array([len(p) + len(r) for p, r in zip(prefixes, rollouts)], np.int64)
    resp_lengths = np.array([len(r) for r in rollouts], np.int64)
    T, T_resp = bucket_length(lengths.max(initial=0), buckets), bucket_length(resp_lengths.max(initial=0), buckets)
    tokens = np.zeros((B, T), np.int32)
    response_tokens = np.zeros((B, T_resp), np.int32)
    for b, (prefix, rollout) in enumerate(zip(prefixes, rollouts)):
        tokens[b, : lengths[b]] = np.concatenate([prefix, rollout])
        response_tokens[b, : len(rollout)] = rollout
    real = np.arange(T)[None] < lengths[:, None]
    positions = np.where(real, np.arange(T)[None], 0).astype(np.int32)
    response_start = np.array([len(p) for p in prefixes], np.int32)
    response_mask = np.arange(T_resp)[None] < resp_lengths[:, None]
    gather_index = np.where(response_mask, response_start[:, None] - 1 + np.arange(T_resp)[None], 0).astype(np.int32)
    return (tokens, positions, real.astype(np.int32), response_start, gather_index, response_tokens,
            response_mask.astype(np.float32))


def _check_groups(questions: Sequence[Tokens], rollouts: Sequence[Tokens]) -> int:
    """Group size G = len(rollouts) / len(questions), checked."""
    if not len(questions) or len(rollouts) % len(questions):
        raise ValueError(
            f"{len(rollouts)} rollouts for {len(questions)} questions: pass G rollouts per question, group-major."
        )
    return len(rollouts) // len(questions)


def build_student_batch(
    template: TemplateTokens,
    questions: Sequence[Tokens],
    rollouts: Sequence[Tokens],
    *,
    buckets: int | Sequence[int] = 128,
) -> StudentBatch:
    """Student rows `[student_prompt(q_g) ; o_b]` for `N` questions and `B = N * G` rollouts (group-major)."""
    G = _check_groups(questions, rollouts)
    prompts = [student_prompt(template, questions[b // G]) for b in range(len(rollouts))]
    return StudentBatch(*_pack(prompts, [_ids(r) for r in rollouts], buckets))


def _demonstration(
    b: int, mode: str, G: int, rollouts: Sequence[np.ndarray], peer: np.ndarray,
    solutions: Sequence[Tokens | None] | None, template: TemplateTokens, think: bool,
) -> np.ndarray | None:
    """The demonstration tokens of row b (None when the row has none)."""
    if mode == "solution":
        solution = None if solutions is None else solutions[b // G]
        if solution is None:
            raise ValueError(
                f"solutions[{b // G}] is missing: mode='solution' needs a reference solution for every "
                "question; use mode='answer' or drop questions without one."
            )
        demo = _ids(solution)
    elif mode in ("peer", "peer_answer") and peer[b] >= 0:
        demo = strip_stops(rollouts[peer[b]], template.stops)
    else:
        return None
    return strip_think(demo, template.think_open, template.think_close) if think else demo


def _teacher_prefix(
    t: TemplateTokens, question: np.ndarray, answer: np.ndarray | None, demo: np.ndarray | None,
    rollout_len: int, max_len: int | None, row: int,
) -> tuple[np.ndarray, int]:
    """`[user_open ; q ; answer block? ; demo block? ; context_close? ; user_close ; assistant_open]`,
    with the demonstration's tail cut so that prefix + rollout <= max_len. Returns (prefix, tokens cut)."""
    answer_block = [] if answer is None else [t.answer_open, answer, t.answer_close]
    close = [t.context_close] if answer is not None or demo is not None else []
    outer = [t.user_open, question, *answer_block, *close, t.user_close, t.assistant_open]
    needed = sum(map(len, outer)) + rollout_len + (0 if demo is None else len(t.demo_open) + len(t.demo_close))
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"max_len={max_len} is too small for row {row}: question, answer, template and rollout take {needed} "
            "tokens (the demonstration is the only part that is cut); raise max_len."
        )
    cut = 0
    demo_block = []
    if demo is not None:
        keep = len(demo) if max_len is None else min(len(demo), max_len - needed)
        cut = len(demo) - keep
        demo_block = [t.demo_open, demo[:keep], t.demo_close]
    pieces = [t.user_open, question, *answer_block, *demo_block, *close, t.user_close, t.assistant_open]
    return np.concatenate(pieces), cut


def build_teacher_batch(
    template: TemplateTokens,
    questions: Sequence[Tokens],
    rollouts: Sequence[Tokens],
    *,
    mode: str,
    answers: Sequence[Tokens] | None = None,
    solutions: Sequence[Tokens | None] | None = None,
    peer_index: np.ndarray | None = None,
    strip_think_block: bool = False,
    max_len: int | None = None,
    buckets: int | Sequence[int] = 128,
) -> TeacherBatch:
    """Teacher rows `[user_open ; q ; context ; user_close ; assistant_open ; o_b]` (see module doc).

    Args:
      template: `encode_template(tokenizer, TeacherTemplate(...))`.
      questions: `N` question token sequences (content only, no chat markup).
      rollouts: `B = N * G` response token sequences, group-major, exactly as sampled.
      mode: `none` (GRPO: no context, all rows masked), `answer` (OPSD), `solution` (OPSD with a
        reference solution, error when one is missing), `peer` (SDPO: rows without a peer are
        masked), `peer_answer` (HSD: answer + peer, the answer alone when no peer).
      answers: `N` reference-answer token sequences (modes `answer`, `peer_answer`).
      solutions: `N` reference-solution token sequences or None (mode `solution`).
      peer_index: `[N, G]` within-group peers from `select_peers` (modes `peer`, `peer_answer`).
      strip_think_block: remove the `<think>...</think>` block from demonstrations. Default
        False: HSD's teacher reads the peer's whole path, reasoning included (that path is what it
        distils); pass True for SDPO-style contexts that show only the final response.
      max_len: maximum unpadded teacher length; longer rows keep the head of the demonstration
        (never cut the question, answer or rollout) and count the dropped tokens.
      buckets: padding of T and T_resp (see `bucket_length`); use the student batch's value.
    """
    if mode not in CONTEXT_MODES:
        raise ValueError(f"Unknown context mode {mode!r}: use one of {CONTEXT_MODES}.")
    G = _check_groups(questions, rollouts)
    N, B = len(questions), len(rollouts)
    rollouts = [_ids(r) for r in rollouts]
    if mode in ("answer", "peer_answer") and (answers is None or len(answers) != N):
        raise ValueError(f"mode={mode!r} needs answers: one reference-answer token sequence per question ({N}).")
    if mode == "solution" and (solutions is None or len(solutions) != N):
        raise ValueError(f"mode='solution' needs solutions: one token sequence (or None) per question ({N}).")
    peer = np.full(B, -1, np.int32)
    if peer_index is not None:
        if np.shape(peer_index) != (N, G):
            raise ValueError(f"peer_index has shape {np.shape(peer_index)}, expected [num_groups, G] = {(N, G)}.")
        peer = flat_peer_index(peer_index)
    elif mode in ("peer", "peer_answer"):
        raise ValueError(f"mode={mode!r} needs peer_index: pass select_peers(rewards.reshape(N, G), ...).")

    prefixes, dropped = [], np.zeros(B, np.int32)
    for b in range(B):
        answer = _ids(answers[b // G]) if mode in ("answer", "peer_answer") else None
        demo = _demonstration(b, mode, G, rollouts, peer, solutions, template, strip_think_block)
        question = _ids(questions[b // G])
        prefix, dropped[b] = _teacher_prefix(template, question, answer, demo, len(rollouts[b]), max_len, b)
        prefixes.append(prefix)

    tokens, positions, segment_ids, response_start, gather_index, _, _ = _pack(prefixes, rollouts, buckets)
    has_peer = peer >= 0
    distill = {"none": np.zeros(B), "peer": has_peer}.get(mode, np.ones(B))
    return TeacherBatch(tokens, positions, segment_ids, response_start, gather_index,
                        np.asarray(distill, np.float32), has_peer, dropped)


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, D], index [B, T_resp] int -> hidden[b, index[b, t]] as [B, T_resp, D]."""
    return jnp.take_along_axis(hidden, index[:, :, None].astype(jnp.int32), axis=1)


# ----------------------------------------------------------------------------------------------
# Diagnostics (Eq. 2, 11, 12)
# ----------------------------------------------------------------------------------------------


def divergence_position(rollout: Tokens, peer: Tokens) -> int:
    """tau = min{t : o_t != o+_t} (Eq. 11). When one sequence is a prefix of the other (or they
    are identical) there is no differing index and tau is the length of the shorter one."""
    a, b = _ids(rollout), _ids(peer)
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def divergence_positions(rollouts: Sequence[Tokens], peer_index: np.ndarray) -> np.ndarray:
    """tau [B] of each rollout against its peer (`[N, G]` within-group peers); -1 without a peer."""
    flat = flat_peer_index(peer_index)
    if len(flat) != len(rollouts):
        raise ValueError(f"peer_index covers {len(flat)} rollouts but {len(rollouts)} were given.")
    return np.array([divergence_position(rollouts[b], rollouts[p]) if p >= 0 else -1 for b, p in enumerate(flat)],
                    np.int32)


def token_credit(teacher_logprobs: jax.Array, student_logprobs: jax.Array, mask: jax.Array) -> jax.Array:
    """A_t = log pi(o_t | q, c, o_<t) - log pi(o_t | q, o_<t) (Eq. 2), zero where mask is 0. All [B, T]."""
    return jnp.where(mask > 0, teacher_logprobs - student_logprobs, 0.0)


def credit_mass_share(
    credit: np.ndarray, tau: np.ndarray, rows: np.ndarray, windows: Sequence[int] = WINDOWS
) -> dict[int, float]:
    """Share of the total |A_t| over `rows` that lies within |t - tau| <= w, for each w (NaN if no mass).

    credit: [B, T] (zero on padding); tau: [B]; rows: [B] bool, e.g. failed & has_peer.
    """
    credit, tau, rows = np.abs(np.asarray(credit, np.float64)), np.asarray(tau), np.asarray(rows, bool)
    distance = np.abs(np.arange(credit.shape[1])[None] - tau[:, None])
    total = credit[rows].sum()
    return {w: float(credit[rows][distance[rows] <= w].sum() / total) if total > 0 else float("nan") for w in windows}


class CreditProfile(NamedTuple):
    """Mean |A_t| at offsets t - tau: offsets [2r+1], mean_abs [2r+1] (NaN where count is 0), count [2r+1]."""

    offsets: np.ndarray
    mean_abs: np.ndarray
    count: np.ndarray


def credit_profile(
    credit: np.ndarray, mask: np.ndarray, tau: np.ndarray, rows: np.ndarray, radius: int = 32
) -> CreditProfile:
    """Mean |A_t| over `rows` aligned at tau, for offsets -radius..radius (only real tokens count).

    credit, mask: [B, T]; tau: [B]; rows: [B] bool.
    """
    credit, mask = np.abs(np.asarray(credit, np.float64)), np.asarray(mask) > 0
    offsets = np.arange(-radius, radius + 1)
    total, count = np.zeros(len(offsets)), np.zeros(len(offsets), np.int64)
    for b in np.flatnonzero(rows):
        t = tau[b] + offsets
        ok = (t >= 0) & (t < credit.shape[1])
        ok[ok] &= mask[b, t[ok]]
        total[ok] += credit[b, t[ok]]
        count[ok] += 1
    with np.errstate(invalid="ignore"):
        return CreditProfile(offsets, np.where(count > 0, total / np.maximum(count, 1), np.nan), count)


def plot_credit_profile(path: str | os.PathLike, profiles: Mapping[str, CreditProfile], title: str = "") -> None:
    """Writes a PNG of mean |A_t| against t - tau, one line per label (the paper's Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, profile in profiles.items():
        ax.plot(profile.offsets, profile.mean_abs, label=label)
    ax.axvline(0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("t - tau (tokens from the divergence position)")
    ax.set_ylabel("mean |A_t|")
    ax.set_title(title or "Credit profile aligned at the divergence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def coverage(rewards: np.ndarray, success_at: float = 1.0) -> float:
    """Fraction of rollouts that fail and have a successful peer in their group. rewards: [N, G]."""
    success = np.asarray(rewards) >= success_at
    if success.ndim != 2:
        raise ValueError(f"rewards has shape {success.shape}: pass [num_groups, G].")
    return float(np.mean(~success & success.any(axis=1, keepdims=True)))


def coverage_formula(p: float | np.ndarray, group_size: int) -> float | np.ndarray:
    """f(p, G) = (1 - p)(1 - (1 - p)^(G - 1)) (Eq. 12): expected coverage at success rate p."""
    return (1 - p) * (1 - (1 - p) ** (group_size - 1))


def credit_metrics(
    rewards: np.ndarray, tau: np.ndarray, credit: np.ndarray, mask: np.ndarray, success_at: float = 1.0
) -> dict[str, float]:
    """Scalars to log per step: coverage, f(p_hat, G), and the |A_t| share near tau (failed rows with peers).

    rewards: [N, G]; tau: [B = N * G] divergence positions (-1 without a peer); credit, mask: [B, T_resp].
    """
    rewards = np.asarray(rewards)
    rows = (rewards.reshape(-1) < success_at) & (np.asarray(tau) >= 0)
    p_hat = float(np.mean(rewards >= success_at))
    metrics = {
        "coverage": coverage(rewards, success_at),
        "coverage_formula": float(coverage_formula(p_hat, rewards.shape[1])),
    }
    credit = np.where(np.asarray(mask) > 0, np.asarray(credit), 0.0)
    metrics.update({f"credit_mass_w{w}": share for w, share in credit_mass_share(credit, tau, rows).items()})
    return metrics


def divergence_metrics(
    rewards: np.ndarray,
    rollouts: Sequence[Tokens],
    peer_index: np.ndarray,
    credit: np.ndarray,
    mask: np.ndarray,
    success_at: float = 1.0,
) -> dict[str, float]:
    """`credit_metrics` with tau from the rollouts and their peers. rewards, peer_index: [N, G];
    rollouts: B = N * G token arrays; credit, mask: [B, T_resp]."""
    return credit_metrics(rewards, divergence_positions(rollouts, peer_index), credit, mask, success_at)
