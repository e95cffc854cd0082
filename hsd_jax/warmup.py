"""The supervised warm-up: next-token likelihood of reference solutions before RL (toy task).

A tiny random model cannot read a privileged context it has never seen, so each solution is
learned both in the student's format and in the teacher's: after the question, the answer and
a successful demonstration (here the solution itself), as HSD's teacher will see them. The
batches come from `batch.assemble`, as RL batches do: each question is a group of two
successful rollouts (its solution twice), each the other's peer.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hsd_jax import batch as batch_lib
from hsd_jax import data, hindsight, losses, rollout, sharding, validation


def response_nll(graphdef: nnx.GraphDef, params: nnx.State, rows: batch_lib.ModelRows, targets: jax.Array,
                 mask: jax.Array, chunk_size: int) -> jax.Array:
    """Mean negative log-likelihood [] of `targets` [B, T_resp] over `mask` [B, T_resp], read in `rows`."""
    hidden = batch_lib.response_hidden(graphdef, params, rows)
    logprobs, _ = losses.token_logprobs(hidden, batch_lib.lm_head(graphdef, params), targets, chunk_size=chunk_size)
    return -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def sft_step(params: nnx.State, opt_state, batch: batch_lib.TrainBatch, teacher_mask: jax.Array, *,
             graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, chunk_size: int):
    """One supervised step on the mean of the student-format NLL (over `batch.response_mask`) and
    the teacher-format NLL (over `teacher_mask` [B, T_resp]) of the batch's response tokens.

    Reads the batch's rows and response tokens and mask (not its RL fields).
    Returns (params, opt_state, loss []).
    """

    def loss_fn(params):
        nll = lambda rows, mask: response_nll(graphdef, params, rows, batch.response_tokens, mask, chunk_size)
        return (nll(batch.student, batch.response_mask) + nll(batch.teacher, teacher_mask)) / 2

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def warmup_batch(
    rows: Sequence[dict],
    tokenizer,
    template: hindsight.TemplateTokens,
    *,
    eos_id: int,
    hindsight_cfg: ml_collections.ConfigDict,
    kind: str = "math",
    slip_rate: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[batch_lib.TrainBatch, np.ndarray]:
    """The host batch of Q dataset rows (B = 3Q rows) and its teacher mask [B, T_resp] (`sft_step`).

    Each row makes a group of three rollouts (+ EOS): its solution as written, the solution, and
    another as written. As written is the solution itself, or with `slip_rate` (rows that are toy
    walks, `data.TOY_QUESTION`) a walk that slips (`data.toy_walk`, drawn with `rng`): a solver
    that knows every step but slips now and then. The student format learns all three, slips
    included. The teacher format learns HSD's two contexts (`peer_answer`, after the answer: a
    code row's tests), every step but the slips: the first rollout with the solution as its peer,
    and the third with the answer alone, HSD's fallback. The second is only the peer. So the
    teacher is the same solver that, given a context, does not slip: on the demonstration's path
    and after the response leaves it, where it walks on from the response's symbol.

    Each row's prompt takes its own kind's instruction (its "kind" field; `kind` where it has none).
    `hindsight_cfg` (`config.hindsight`) gives buckets, strip_think and max_tests_tokens. The RL fields keep their defaults.
    """
    questions = rollout.question_tokens(tokenizer, rows, kind)

    def write(row: dict) -> tuple[str, list[tuple[int, int]]]:
        """(the solution as written, the character span of each slipped step); only toy walks slip."""
        if slip_rate and data.TOY_QUESTION.fullmatch(row["question"]):
            return data.toy_walk(row["question"], slip_rate, rng)
        return row["solution"], []

    written = [(write(r), write(r)) for r in rows]
    answers, solutions = rollout.reference_tokens(tokenizer, rows, max_tests_tokens=hindsight_cfg.max_tests_tokens)
    texts = hindsight.encode_texts(tokenizer, [text for pair in written for text, _ in pair])
    responses = [np.append(s, eos_id) for i, solution in enumerate(solutions)
                 for s in (texts[2 * i], solution, texts[2 * i + 1])]
    peers = np.tile([1, -1, -1], (len(rows), 1))
    batch, _ = batch_lib.assemble(template, questions, responses, peers, answers, context="peer_answer",
                                  buckets=hindsight_cfg.buckets, strip_think=hindsight_cfg.strip_think)
    teacher_mask = np.array(batch.response_mask)
    teacher_mask[1::3] = 0
    for i, pair in enumerate(written):
        for row, (text, slips) in zip((3 * i, 3 * i + 2), pair):
            for start, end in slips:
                teacher_mask[row, len(tokenizer.encode(text[:start])) : len(tokenizer.encode(text[:end]))] = 0
    return batch, teacher_mask


def require_solutions(rows: Sequence[dict]) -> None:
    """The warm-up learns reference solutions: every row needs one."""
    if not all(r.get("solution") for r in rows):
        raise validation.ConfigError(
            "config.train.sft_warmup_steps > 0 needs a 'solution' in every training row; set it to 0.")


def rows_that_fit(rows: Sequence[dict], make_batch: Callable[[list[dict]], batch_lib.TrainBatch]) -> list[dict]:
    """The rows whose warm-up sequences (student and teacher) fit the largest bucket."""
    fit = []
    for row in rows:
        try:
            make_batch([row])
        except hindsight.TooLong:
            continue
        fit.append(row)
    return fit


def sft_warmup(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    rows: Sequence[dict],
    make_batch: Callable[[list[dict]], tuple[batch_lib.TrainBatch, np.ndarray]],
    *,
    steps: int,
    learning_rate: float,
    rows_per_step: int,
    chunk_size: int,
    mesh: jax.sharding.Mesh,
    rng: np.random.Generator,
    on_step: Callable[[int, jax.Array], None] | None = None,
) -> nnx.State:
    """`steps` Adam steps on batches of `rows_per_step` rows drawn by `rng`; returns the new params.

    make_batch: rows -> host (`TrainBatch`, teacher mask) (e.g. `warmup_batch` with its settings bound).
    on_step(steps_done, loss []) runs after each step (progress, logging).
    """
    if not rows:
        raise ValueError("config.train.sft_warmup_steps > 0 but no training row fits the warm-up's buckets; "
                         "raise config.hindsight.buckets or set sft_warmup_steps=0.")
    require_solutions(rows)
    optimizer = optax.adam(learning_rate)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.optimizer_shardings(optimizer, params))(params)
    step_fn = jax.jit(partial(sft_step, graphdef=graphdef, optimizer=optimizer, chunk_size=chunk_size))
    per_process = max(1, rows_per_step // jax.process_count())
    first = jax.process_index() * per_process
    for i in range(steps):  # every process draws the same rows and builds its slice of them
        picked = [rows[j] for j in rng.integers(0, len(rows), per_process * jax.process_count())]
        local = picked[first : first + per_process]
        params, opt_state, loss = step_fn(params, opt_state, *batch_lib.place(make_batch(local), mesh))
        if on_step is not None:
            on_step(i + 1, loss)
    return params
