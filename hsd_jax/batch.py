"""The train batch: a typed pytree, its assembly on the host, its placement on the mesh.

`TrainBatch` is what crosses the jit boundary of `trainer.update_step` and `warmup.sft_step`.
One assembly, `assemble`, builds it for both: RL steps call it through `from_rollouts` (peers,
advantages, sampler log-probs of scored rollouts); the supervised warm-up calls it with reference
solutions as the rollouts and leaves the RL-only fields at their defaults.

Shapes: `Q` questions, `G` rollouts per question, `B = Q * G` rows (group-major: row `b` answers
question `b // G`), `T` padded row length (student and teacher rows differ), `T_resp` padded
response length (shared), `D` model dim, `V` vocab. Rows are right-padded to `hindsight` buckets.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hsd_jax import hindsight, losses, sampling, sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelRows:
    """The inputs of one forward pass: student rows `[q ; o]` or teacher rows `[q ; c ; o]`.

    tokens: [B, T] int32 token ids, right-padded with 0.
    positions: [B, T] int32, 0, 1, ... along each row, 0 on padding.
    gather_index: [B, T_resp] int32: the hidden state at `gather_index[b, t]` predicts response
      token t of row b (0 past the response's end).
    """

    tokens: np.ndarray | jax.Array
    positions: np.ndarray | jax.Array
    gather_index: np.ndarray | jax.Array

    @classmethod
    def of(cls, rows: hindsight.StudentBatch | hindsight.TeacherBatch) -> ModelRows:
        """The model inputs of a `hindsight` student or teacher batch."""
        return cls(tokens=rows.tokens, positions=rows.positions, gather_index=rows.gather_index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainBatch:
    """One step's B rollouts, as the jitted update reads them.

    student: `ModelRows` of `[student prompt ; o_b]`, the rows the policy is trained on.
    teacher: `ModelRows` of `[teacher prompt with privileged context ; o_b]`, aligned with
      `student` at the response positions.
    response_tokens: [B, T_resp] int32, the rollout tokens (the targets), 0-padded.
    response_mask: [B, T_resp] float32, 1 on response tokens of kept rows (rows of groups that
      DAPO's dynamic sampling drops are all 0).
    distill_mask: [B] float32, 1 where the row is distilled (its teacher has a context).
    advantages: [B] float32, the group advantage of each rollout (0 in the warm-up).
    sampler_logprobs: [B, T_resp] float32, the log-probs the sampler drew the tokens with
      (0 past a row's end and in the warm-up).
    """

    student: ModelRows
    teacher: ModelRows
    response_tokens: np.ndarray | jax.Array
    response_mask: np.ndarray | jax.Array
    distill_mask: np.ndarray | jax.Array
    advantages: np.ndarray | jax.Array
    sampler_logprobs: np.ndarray | jax.Array


def pad_to(x: np.ndarray, length: int) -> np.ndarray:
    """Right-pads (or crops) the last axis of [B, T] to `length` with zeros."""
    out = np.zeros((x.shape[0], length), x.dtype)
    n = min(length, x.shape[1])
    out[:, :n] = x[:, :n]
    return out


def assemble(
    template: hindsight.TemplateTokens,
    questions: Sequence[np.ndarray],
    responses: Sequence[np.ndarray],
    peer_index: np.ndarray,
    answers: Sequence[np.ndarray],
    *,
    context: str,
    buckets: int | Sequence[int],
    strip_think: bool,
    max_teacher_len: int | None = None,
    solutions: Sequence[np.ndarray | None] | None = None,
    advantages: np.ndarray | None = None,
    keep: np.ndarray | None = None,
    sampler_logprobs: np.ndarray | None = None,
) -> tuple[TrainBatch, hindsight.TeacherBatch]:
    """Host arrays of a batch: student and teacher rows, targets, masks and the RL fields.

    questions: Q user-turn token arrays; responses: B = Q * G response token arrays, group-major.
    peer_index: [Q, G] within-group peers (`hindsight.select_peers`); answers / solutions: Q
    reference token arrays. context, strip_think, max_teacher_len: the teacher context
    (`hindsight.build_teacher_batch`'s mode, strip_think_block, max_len); buckets: row padding.
    advantages: [B] (default 0); keep: [B] bool rows to train on (default all);
    sampler_logprobs: [B, M] float, cropped or zero-padded to T_resp (default 0).
    Returns the batch and the `hindsight.TeacherBatch` (for its truncation count).
    """
    student = hindsight.build_student_batch(template, questions, responses, buckets=buckets)
    teacher = hindsight.build_teacher_batch(
        template, questions, responses, mode=context, buckets=buckets, answers=answers, solutions=solutions,
        peer_index=peer_index, strip_think_block=strip_think, max_len=max_teacher_len,
    )
    B, T_resp = student.response_tokens.shape
    mask = student.response_mask
    if keep is not None:
        mask = mask * np.asarray(keep).reshape(-1, 1)
    batch = TrainBatch(
        student=ModelRows.of(student),
        teacher=ModelRows.of(teacher),
        response_tokens=student.response_tokens,
        response_mask=mask,
        distill_mask=teacher.distill_mask,
        advantages=np.zeros(B, np.float32) if advantages is None else np.asarray(advantages, np.float32).reshape(-1),
        sampler_logprobs=np.zeros((B, T_resp), np.float32) if sampler_logprobs is None
        else pad_to(np.asarray(sampler_logprobs, np.float32), T_resp),
    )
    return batch, teacher


def from_rollouts(
    template: hindsight.TemplateTokens,
    questions: Sequence[np.ndarray],
    answers: Sequence[np.ndarray],
    solutions: Sequence[np.ndarray | None],
    rollouts: sampling.Rollouts,
    responses: Sequence[np.ndarray],
    rewards: np.ndarray,
    *,
    hindsight_cfg: ml_collections.ConfigDict,
    loss_cfg: losses.LossConfig,
    rng: np.random.Generator,
) -> tuple[TrainBatch, np.ndarray, hindsight.TeacherBatch]:
    """The batch of one RL step from G scored rollouts per question.

    rollouts: host `sampling.Rollouts` of B = Q * G rows (lengths and logprobs are read);
    responses: their B token arrays (`rollout.responses`); rewards: [B] verifier rewards.
    hindsight_cfg: `config.hindsight` (context, peer_rule, buckets, strip_think, max_teacher_len);
    rng draws the peers. Peers are chosen among each group's successes, advantages and DAPO's
    keep mask follow `loss_cfg` (`losses.rollout_advantages`).
    Returns (batch, peer_index [Q, G], the `hindsight.TeacherBatch`).
    """
    h = hindsight_cfg
    G = len(responses) // len(questions)
    lengths = np.asarray(rollouts.lengths)
    mean_logprob = np.asarray(rollouts.logprobs).sum(1) / np.maximum(lengths, 1)
    # Peers are drawn over every process's groups with the same rng, then each process keeps its
    # own: the draw does not depend on how many processes share the batch.
    every = sharding.gather_rows(dict(rewards=rewards, lengths=lengths, mean_logprob=mean_logprob))
    all_peers = hindsight.select_peers(
        every["rewards"].reshape(-1, G), rule=h.peer_rule, rng=rng,
        lengths=every["lengths"].reshape(-1, G), mean_logprobs=every["mean_logprob"].reshape(-1, G),
    )
    first = jax.process_index() * len(questions)
    peers = all_peers[first : first + len(questions)]
    advantages, keep = losses.rollout_advantages(
        jnp.asarray(rewards).reshape(-1, G), jnp.asarray(lengths).reshape(-1, G), loss_cfg
    )
    batch, teacher = assemble(
        template, questions, responses, peers, answers, context=h.context, buckets=h.buckets,
        strip_think=h.strip_think, max_teacher_len=h.max_teacher_len, solutions=solutions,
        advantages=advantages, keep=keep, sampler_logprobs=rollouts.logprobs,
    )
    return batch, peers, teacher


def place(batch: TrainBatch, mesh: jax.sharding.Mesh) -> TrainBatch:
    """Host arrays -> global device arrays split over the batch axes of `mesh`.

    Multi-process: each process passes its own rows; every padded length is first raised to the
    largest any process has (zero padding, like the buckets'), so all agree on the shapes.
    """
    leaves, treedef = jax.tree.flatten(batch)
    lengths = sharding.agree_max([x.shape[1] if x.ndim > 1 else 0 for x in leaves])
    leaves = [pad_to(x, int(n)) if x.ndim > 1 and x.shape[1] != n else x for x, n in zip(leaves, lengths)]
    return treedef.unflatten([sharding.host_to_global(x, mesh) for x in leaves])


# ------------------------------------------------------------------------------------------------
# How the model reads a batch (inside jit)
# ------------------------------------------------------------------------------------------------


def response_hidden(graphdef: nnx.GraphDef, params: nnx.State, rows: ModelRows) -> jax.Array:
    """Final hidden states at the response positions of `rows`: [B, T_resp, D].

    Rows are right-padded, so causal attention alone keeps padding out of every real position:
    no mask, and the model's fused attention path.
    """
    model = nnx.merge(graphdef, params)
    hidden, _ = model(rows.tokens, rows.positions)
    return hindsight.gather_positions(hidden, rows.gather_index)


def lm_head(graphdef: nnx.GraphDef, params: nnx.State) -> jax.Array:
    """The model's LM head [D, V] (the tied embedding when the model ties them)."""
    return nnx.merge(graphdef, params).head()
