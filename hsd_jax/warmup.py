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
from hsd_jax import hindsight, losses, rollout, sharding, validation


def response_nll(graphdef: nnx.GraphDef, params: nnx.State, rows: batch_lib.ModelRows, targets: jax.Array,
                 mask: jax.Array, chunk_size: int) -> jax.Array:
    """Mean negative log-likelihood [] of `targets` [B, T_resp] over `mask` [B, T_resp], read in `rows`."""
    hidden = batch_lib.response_hidden(graphdef, params, rows)
    logprobs, _ = losses.token_logprobs(hidden, batch_lib.lm_head(graphdef, params), targets, chunk_size=chunk_size)
    return -(logprobs * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def sft_step(params: nnx.State, opt_state, batch: batch_lib.TrainBatch, *, graphdef: nnx.GraphDef,
             optimizer: optax.GradientTransformation, chunk_size: int):
    """One supervised step on the mean of the student-format and teacher-format NLLs.

    Reads the batch's rows and response tokens and mask (not its RL fields).
    Returns (params, opt_state, loss []).
    """

    def loss_fn(params):
        nll = lambda rows: response_nll(graphdef, params, rows, batch.response_tokens, batch.response_mask, chunk_size)
        return (nll(batch.student) + nll(batch.teacher)) / 2

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
) -> batch_lib.TrainBatch:
    """The host batch of Q dataset rows: B = 2Q rows, each solution (+ EOS) twice as a group of peers.

    Each row's prompt takes its own kind's instruction (its "kind" field; `kind` where it has none).

    The teacher context is HSD's (`peer_answer`): the answer (a code row's tests) and the solution;
    `hindsight_cfg` (`config.hindsight`) gives buckets, strip_think and max_tests_tokens. The RL fields keep their defaults.
    """
    questions = rollout.question_tokens(tokenizer, rows, kind)
    answers, solutions = rollout.reference_tokens(tokenizer, rows, max_tests_tokens=hindsight_cfg.max_tests_tokens)
    responses = [np.append(s, eos_id) for s in solutions for _ in range(2)]
    peers = np.tile([1, 0], (len(rows), 1))
    batch, _ = batch_lib.assemble(template, questions, responses, peers, answers, context="peer_answer",
                                  buckets=hindsight_cfg.buckets, strip_think=hindsight_cfg.strip_think)
    return batch


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
    make_batch: Callable[[list[dict]], batch_lib.TrainBatch],
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

    make_batch: rows -> host `TrainBatch` (e.g. `warmup_batch` with its settings bound).
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
        params, opt_state, loss = step_fn(params, opt_state, batch_lib.place(make_batch(local), mesh))
        if on_step is not None:
            on_step(i + 1, loss)
    return params
