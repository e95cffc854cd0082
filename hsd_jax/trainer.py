"""Training: the train state, the one jitted update, and the loop that wires the parts together.

The trainer modules are the only place that wires the pieces together (DESIGN.md, "Data flow"):

    rollout.py  examples --sampling.generate--> G rollouts per question --rewards.Scorer--> R
    batch.py    scored rollouts -> `TrainBatch` (student + teacher rows, targets, masks,
                advantages), shared with the warm-up; placement on the mesh
    warmup.py   supervised steps on reference solutions before RL (the toy task)
    trainer.py  config checks, model setup, `TrainState`, `update_step`, and `Run`:
                rollout -> batch -> update -> log / checkpoint, and evaluation

`update_step` (ONE jit) runs the reference pass (once per rollout batch, beside the old log-probs
of PPO's ratio), then per micro-batch the teacher pass (stop-grad), the student pass (grad) and the
fused chunked loss, then the optax update. It is pure over a `TrainState` pytree and
accumulates gradients over micro-batches with `lax.scan`; every loss term is normalised by
whole-batch denominators (`losses.loss_denominators`), so the result equals one big batch. A run
resumes from the latest checkpoint in its workdir: params, optimizer state, step and the data
iterator's position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hsd_jax import batch as batch_lib
from hsd_jax import data, evaluate, export, hindsight, losses, reporting, rewards, rollout, sampling, sharding, validation, warmup
from hsd_jax.checkpoint import Checkpointer, restore_params, save_params
from hsd_jax.rewards.code import SandboxLimits
from hsd_jax._models import hf, qwen3

logger = logging.getLogger(__name__)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything an update changes: step [] int32, params (nnx.State), optimizer state, and the
    EMA teacher's params (`loss.teacher_ema > 0`, SDPO; None when the teacher is the current policy)."""

    step: jax.Array
    params: Any
    opt_state: Any
    teacher_params: Any = None


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (PAPER.md: b1 0.9, b2 0.95, eps 1e-8, wd 0, lr 1e-6)."""
    o = config.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(o.learning_rate, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )


# ------------------------------------------------------------------------------------------------
# Model and tokenizer
# ------------------------------------------------------------------------------------------------


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str):
    """The run's tokenizer: config.tokenizer_path, else model.path, else the toy tokenizer."""
    path = config.tokenizer_path or config.model.path
    if not path:
        if config.data.kind != "toy":
            raise ValueError("config.tokenizer_path is empty and there is no model.path to take it from.")
        path = data.build_toy_tokenizer(os.path.join(workdir, "tokenizer"))
    return hf.load_tokenizer(path)


def model_config(config: ml_collections.ConfigDict, tokenizer) -> qwen3.Qwen3Config:
    """Architecture + dtypes: from the checkpoint (`model.path`; a preset beside it only documents
    the expected architecture, with a warning where they differ), the preset, or `model.arch`
    (random init)."""
    m = config.model
    options = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
    if m.path:
        loaded = qwen3.Qwen3Config.from_hf(m.path, **options)
        if m.preset:
            expected = qwen3.Qwen3Config.preset(m.preset, **options)
            differ = [f.name for f in dataclasses.fields(loaded) if getattr(loaded, f.name) != getattr(expected, f.name)]
            if differ:
                logger.warning("config.model.path=%s differs from model.preset=%r in %s; the checkpoint's "
                               "architecture is used", m.path, m.preset, ", ".join(differ))
        return loaded
    if m.preset:
        return qwen3.Qwen3Config.preset(m.preset, **options)
    vocab = -(-len(tokenizer) // 128) * 128
    return qwen3.Qwen3Config(vocab_size=vocab, **m.arch.to_dict(), **options)


def initial_params(config: ml_collections.ConfigDict, model_cfg: qwen3.Qwen3Config, mesh) -> tuple[Any, Any]:
    """(graphdef, params) of the initial policy pi_0, created directly in their shardings."""
    if config.model.path:
        m = config.model
        return nnx.split(hf.load_model(m.path, mesh=mesh, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat))
    graphdef, abstract = nnx.split(qwen3.abstract_model(model_cfg))
    init = lambda: nnx.split(qwen3.Qwen3(model_cfg, rngs=nnx.Rngs(config.seed)))[1]
    return graphdef, jax.jit(init, out_shardings=sharding.state_shardings(abstract, mesh))()


def teacher_template(config: ml_collections.ConfigDict) -> hindsight.TeacherTemplate:
    """Qwen3's chat turns with `config.hindsight.template`'s overrides; with thinking off the
    assistant turn opens with an empty think block."""
    template = hindsight.TeacherTemplate(**config.hindsight.template.to_dict())
    if not config.data.enable_thinking:
        template = dataclasses.replace(template, assistant_open=template.assistant_open + "<think>\n\n</think>\n\n")
    return template


TOY_PROBLEMS = {"math": data.toy_problem, "code": data.toy_code_problem}


def data_files(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, list[str]], list[evaluate.EvalSet]]:
    """Train files by kind of rows (`validation.kind_files`) and eval sets (`validation.eval_sets`).
    The toy task writes its own into `workdir`: a train file per kind of the mixture (toy math:
    toy_train.jsonl) and, unless `data.eval_files` names some, an eval set per kind."""
    d = config.data
    eval_sets = validation.eval_sets(config)
    if d.kind != "toy":
        return validation.kind_files(d.train_files, validation.row_kind(config)), eval_sets
    train, toy_evals = {}, []
    for kind in validation.mixture(config):
        name, problem = ("toy" if kind == "math" else f"toy_{kind}"), TOY_PROBLEMS[kind]
        train[kind] = [data.write_toy_dataset(os.path.join(workdir, f"{name}_train.jsonl"), d.toy_examples, config.seed,
                                              problem, split="train")]
        toy_evals.append(f"{kind}=" + data.write_toy_dataset(os.path.join(workdir, f"{name}_eval.jsonl"), 64,
                                                             config.seed + 1, problem, split="eval"))
    return train, eval_sets or evaluate.parse_eval_files(",".join(toy_evals), config.train.eval_samples)


def decode_params(params, decode_layout: str, model_cfg: qwen3.Qwen3Config, mesh):
    """Params for decoding (`Run.decode_params`): "train" the arrays themselves; "tensor" a copy in
    the compute dtype in the sampler's tensor-parallel layout, made one array at a time."""
    if decode_layout == "train":
        return params
    dtype = jnp.dtype(model_cfg.dtype)
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return sampling.sampling_params(cast, mesh)


# ------------------------------------------------------------------------------------------------
# The jitted update
# ------------------------------------------------------------------------------------------------


def micro_batch_loss(params, teacher_params, batch: batch_lib.TrainBatch, old_logprobs, ref_logprobs, denominators,
                     graphdef, cfg: losses.LossConfig):
    """HSD / GRPO-family loss of one micro-batch of b rows and its metrics.

    old_logprobs: [b, T_resp] log-probs of the policy that sampled the rows (the PPO ratio's
    denominator), or None when the update is the first and only one on these rows: the sampling
    policy is then the current one and the ratio is exactly 1 (its gradient A * grad log p, as in
    on-policy GRPO). ref_logprobs: [b, T_resp] the reference model's (`cfg.beta > 0`; computed
    once per rollout batch by `policy_logprobs`), else None. denominators:
    `losses.loss_denominators` of the rows one optimizer step reads. The teacher pass (with
    `teacher_params`, stop-gradient) runs only when `cfg.needs_teacher`.
    Returns (loss, (metrics, credit [b, T_resp])), credit 0 without a teacher.
    """
    targets, mask = batch.response_tokens, batch.response_mask
    student = batch_lib.response_hidden(graphdef, params, batch.student)
    head = batch_lib.lm_head(graphdef, params)
    teacher = teacher_head = None
    if cfg.needs_teacher:
        teacher_params = jax.lax.stop_gradient(teacher_params)
        teacher = batch_lib.response_hidden(graphdef, teacher_params, batch.teacher)
        teacher_head = batch_lib.lm_head(graphdef, teacher_params)
    inputs = losses.LossInputs(logprobs=None, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                               advantages=batch.advantages, distill_mask=batch.distill_mask)
    loss, metrics, out = losses.chunked_objective(student, head, targets, inputs, cfg, teacher_hidden=teacher,
                                                  teacher_head=teacher_head, denominators=denominators)
    logprobs, credit = out.logprobs, out.credit
    gap = jnp.abs(batch.sampler_logprobs - logprobs) * mask
    metrics["sampler_logprob_gap"] = gap.sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, (metrics, jnp.zeros_like(logprobs) if credit is None else credit)


ADDITIVE_METRICS = ("loss", "pg_loss", "distill_loss", "ref_kl")
# Independent random streams, each folded with the step (see step_key / step_rng).
STREAM_SAMPLE, STREAM_PEERS, STREAM_EVAL, STREAM_WARMUP, STREAM_REFILL = range(5)


def split_rows(tree, parts: int):
    """[B, ...] leaves -> [parts, B // parts, ...]: part m takes rows m, m + parts, m + 2 parts, ...,
    so that with the rows split over devices every part is too (no data moves)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // parts, parts, *x.shape[1:]).swapaxes(0, 1), tree)


def join_rows(x: jax.Array) -> jax.Array:
    """The inverse of `split_rows` for one array: [parts, B // parts, ...] -> [B, ...]."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def policy_logprobs(param_sets: dict[str, Any], batch: batch_lib.TrainBatch, *, graphdef, cfg: losses.LossConfig,
                    micro_batches: int, mesh=None) -> dict[str, jax.Array]:
    """log pi(o_t) [B, T_resp] of the rollout tokens under each params of `param_sets` (name ->
    params; at the loss temperature, the full distribution: not the sampler's top-p renormalised
    one), one forward pass each, `micro_batches` rows at a time. Returns name -> log-probs."""

    def micro_logprobs(micro):
        micro = sharding.constrain_batch(micro, mesh)
        logprobs = {}
        for name, params in param_sets.items():
            hidden = batch_lib.response_hidden(graphdef, params, micro.student)
            logprobs[name], _ = losses.token_logprobs(hidden, batch_lib.lm_head(graphdef, params), micro.response_tokens,
                                                      temperature=cfg.temperature, chunk_size=cfg.chunk_size)
        return logprobs

    return jax.tree.map(join_rows, jax.lax.map(micro_logprobs, split_rows(batch, micro_batches)))


def optimizer_step(state: TrainState, batch: batch_lib.TrainBatch, old_logprobs, ref_logprobs, *, graphdef,
                   optimizer, cfg: losses.LossConfig, micro_batches: int, mesh=None):
    """One optimizer step on the rows of `batch`, accumulated over `micro_batches` (`split_rows`).

    old_logprobs, ref_logprobs: [B, T_resp] each (see `micro_batch_loss`) or None. Gradients
    accumulate in float32; every term is normalised by the denominators of all the rows. A non-finite loss or gradient
    never reaches the parameters: the update is skipped (params and optimizer state stay as they
    were, bit for bit) and metrics["update_skipped"] is 1. The teacher reads the current params,
    or the EMA teacher's, which then moves toward the updated params:
    teacher <- (1 - cfg.teacher_ema) * teacher + cfg.teacher_ema * params.
    Returns (new state, metrics, per-token credit [B, T_resp] in the batch's row order).
    """
    teacher_params = state.params if state.teacher_params is None else state.teacher_params
    denominators = losses.loss_denominators(batch.response_mask, batch.distill_mask, cfg)
    grad_fn = jax.grad(micro_batch_loss, has_aux=True)

    def accumulate(grads, micro):
        micro_batch, micro_old, micro_ref = sharding.constrain_batch(micro, mesh)
        g, (metrics, credit) = grad_fn(state.params, teacher_params, micro_batch, micro_old, micro_ref, denominators,
                                       graphdef, cfg)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), (metrics, credit)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    micro = split_rows((batch, old_logprobs, ref_logprobs), micro_batches)
    grads, (metrics, credit) = jax.lax.scan(accumulate, zeros, micro)
    metrics = {k: v.sum() if k in ADDITIVE_METRICS else v.mean() for k, v in metrics.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["update_skipped"] = 1.0 - finite.astype(jnp.float32)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep_finite(params, state.params)
    teacher = state.teacher_params
    if teacher is not None:
        rate = cfg.teacher_ema
        teacher = jax.tree.map(lambda t, p: ((1 - rate) * t + rate * p).astype(t.dtype), teacher, params)
    new_state = dataclasses.replace(state, params=params, opt_state=keep_finite(opt_state, state.opt_state),
                                    teacher_params=teacher)
    return new_state, metrics, join_rows(credit)


def update_step(
    state: TrainState,
    ref_params,
    batch: batch_lib.TrainBatch,
    *,
    graphdef,
    optimizer,
    cfg: losses.LossConfig,
    micro_batches: int,
    minibatches: int = 1,
    epochs: int = 1,
    mesh=None,
):
    """The RL update of one rollout batch of B rows: `epochs` passes over its `minibatches`
    minibatches (`split_rows`), one `optimizer_step` each, `micro_batches` micro-batches per step.

    With a single optimizer step (the default) the rows are on-policy: the PPO ratio is exactly 1.
    With more (PPO, GSPO and DAPO as published), the log-probs of the policy that sampled the
    rows are computed first by one forward pass (`policy_logprobs`), and the ratio, its clipping,
    DAPO's clip-higher, the dual clip and GSPO's sequence ratio act on every later step.
    With a reference KL (`cfg.beta > 0`) the reference model's log-probs are computed once, by
    one forward pass of `ref_params` in the same `policy_logprobs`, and every step reads them.
    Metrics are means over the optimizer steps (`update_skipped`: 1 if any step was skipped);
    `optimizer_steps` counts them. The train state's step advances by one.
    Returns (new state, metrics, per-token credit [B, T_resp] of the first epoch, in row order).
    """
    step_options = dict(graphdef=graphdef, optimizer=optimizer, cfg=cfg, micro_batches=micro_batches, mesh=mesh)
    one_step = minibatches * epochs == 1
    param_sets = {} if one_step else {"old": state.params}
    if cfg.beta > 0:
        param_sets["ref"] = ref_params
    logprobs = policy_logprobs(param_sets, batch, graphdef=graphdef, cfg=cfg, micro_batches=micro_batches * minibatches,
                               mesh=mesh) if param_sets else {}
    old_logprobs, ref_logprobs = logprobs.get("old"), logprobs.get("ref")
    if one_step:
        new_state, metrics, credit = optimizer_step(state, batch, None, ref_logprobs, **step_options)
    else:
        parts = split_rows((batch, old_logprobs, ref_logprobs), minibatches)

        def minibatch_step(state, part):
            new_state, metrics, credit = optimizer_step(state, *part, **step_options)
            return new_state, (metrics, credit)

        def epoch(state, _):
            return jax.lax.scan(minibatch_step, state, parts)

        # metrics: [epochs, minibatches] each; credit: [epochs, minibatches, B // minibatches, T_resp]
        new_state, (metrics, credit) = jax.lax.scan(epoch, state, None, length=epochs)
        metrics = {k: v.max() if k == "update_skipped" else v.mean() for k, v in metrics.items()}
        credit = join_rows(credit[0])
    metrics["optimizer_steps"] = jnp.float32(minibatches * epochs)
    return dataclasses.replace(new_state, step=state.step + 1), metrics, credit


def fresh_state(params, optimizer: optax.GradientTransformation, ema_teacher: bool = False) -> TrainState:
    """Step 0 with fresh optimizer state (and an EMA teacher equal to `params` when asked);
    unplaced: `init_state` places it."""
    teacher = jax.tree.map(jnp.copy, params) if ema_teacher else None
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), teacher)


def train_state_shardings(params, optimizer: optax.GradientTransformation, ema_teacher: bool = False) -> TrainState:
    """Where a `TrainState` of `params` (arrays or ShapeDtypeStructs carrying shardings) lives: the
    params' shardings (the EMA teacher's too), `sharding.optimizer_shardings`, the step replicated."""
    param_shardings = jax.tree.map(lambda p: p.sharding, params)
    return TrainState(step=sharding.replicated_like(jax.tree.leaves(param_shardings)[0]), params=param_shardings,
                      opt_state=sharding.optimizer_shardings(optimizer, params),
                      teacher_params=param_shardings if ema_teacher else None)


def init_state(params, optimizer: optax.GradientTransformation, ema_teacher: bool = False) -> TrainState:
    """Step 0 with fresh optimizer state, placed by `train_state_shardings`."""
    shardings = train_state_shardings(params, optimizer, ema_teacher)
    return jax.jit(fresh_state, static_argnums=(1, 2), out_shardings=shardings)(params, optimizer, ema_teacher)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def step_key(seed: int, stream: int, step: int) -> jax.Array:
    """The PRNG key of `stream` at `step`: a resumed run draws what an uninterrupted one would."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), step)


def rollout_key(seed: int, step: int, refill: int) -> jax.Array:
    """The sampling key of a step's question batch: the first (`refill` 0) draws from STREAM_SAMPLE,
    DAPO's refill-th extra batch from STREAM_REFILL folded with `refill`."""
    if refill:
        return jax.random.fold_in(step_key(seed, STREAM_REFILL, step), refill)
    return step_key(seed, STREAM_SAMPLE, step)


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The host generator of `stream` at `step` (as `step_key`)."""
    return np.random.default_rng([seed, stream, step])


@contextlib.contextmanager
def timed(times: dict[str, float], name: str):
    """Adds the seconds the block took to `times[name]`."""
    start = time.perf_counter()
    yield
    times[name] = times.get(name, 0.0) + time.perf_counter() - start


class NonFiniteUpdates(RuntimeError):
    """`train.max_skipped_updates` consecutive updates had a non-finite loss or gradient."""


class Run:
    """One training run: the model, data, sampler, verifier, checkpoints and reports of `config`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = c = validation.resolve(config)
        self.loss_cfg = validation.validate(c)
        self.workdir = os.path.abspath(c.workdir)
        self.mixture = validation.mixture(c)  # kind of rows -> weight per step
        self.train_files, self.eval_sets = data_files(c, self.workdir)  # kind of rows -> files; eval sets
        try:
            for kind, paths in self.train_files.items():
                data.check_files(paths, kind, "config.data.train_files")
            for eval_set in self.eval_sets:
                data.check_files([eval_set.path], eval_set.kind, "config.data.eval_files")
        except (FileNotFoundError, ValueError) as error:
            raise validation.ConfigError(str(error)) from None
        self.is_main = jax.process_index() == 0
        self.reporter: reporting.Reporter | None = None
        self.mesh = sharding.make_mesh(tuple(c.mesh.shape))
        self.tokenizer = load_tokenizer(c, self.workdir)
        self.template = hindsight.encode_template(self.tokenizer, teacher_template(c))
        self.model_cfg = model_config(c, self.tokenizer)
        self.graphdef, params = initial_params(c, self.model_cfg, self.mesh)
        self.ref_params = jax.tree.map(jnp.copy, params) if self.loss_cfg.beta > 0 else None
        self.optimizer = make_optimizer(c)
        self.state = init_state(params, self.optimizer, self.loss_cfg.teacher_ema > 0)
        self.sampling_cfg = rollout.sampling_config(c.sampling, self.tokenizer)
        try:
            self.dataset, stats = data.mixture_dataset(
                {kind: self.train_files[kind] for kind in self.mixture}, self.mixture, self.tokenizer,
                batch_size=c.data.questions_per_step // jax.process_count(), max_prompt_len=c.data.max_prompt_len,
                seed=c.seed, template=c.data.template, enable_thinking=c.data.enable_thinking,
            )
        except ValueError as error:  # too few rows (of a kind) for a step
            raise validation.ConfigError(f"config.data.train_files: {error}") from None
        self.print(f"data: {stats.summary()}")
        self.data_iter = iter(self.dataset)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), c.train.max_to_keep)
        self.warmup_path = os.path.join(self.workdir, "warmup_policy")
        minibatches = c.train.minibatches_per_step
        jit_options = dict(graphdef=self.graphdef, optimizer=self.optimizer, cfg=self.loss_cfg, mesh=self.mesh,
                           minibatches=minibatches, epochs=c.train.ppo_epochs,
                           micro_batches=c.data.questions_per_step * c.sampling.group_size // c.train.micro_batch
                           // minibatches)
        self.update = jax.jit(partial(update_step, **jit_options), donate_argnums=0)

    def print(self, message: str) -> None:
        """A line on stdout from process 0 (through the reporter once it exists, clear of progress bars)."""
        if self.reporter is not None:
            self.reporter.print(message)
        elif self.is_main:
            print(message, flush=True)

    def decode_params(self):
        """The current policy's params for decoding. With `sampling.decode_layout="tensor"`: a copy
        in the compute dtype (what the model multiplies with anyway, so samples are unchanged)
        moved into the sampler's tensor-parallel layout one array at a time
        (`sampling.sampling_params`), so decode steps do not all-gather FSDP shards. With "train":
        the training arrays themselves."""
        return decode_params(self.state.params, self.config.sampling.decode_layout, self.model_cfg, self.mesh)

    def collect(self, policy: rollout.Policy, scorer: rewards.Scorer,
                times: dict[str, float]) -> tuple[rollout.ScoredGroups, int]:
        """This step's questions (this process's share of `data.questions_per_step`), G scored
        rollouts each from `policy` (keys: `rollout_key`), and how many question batches were drawn
        after the first.

        With DAPO's dynamic sampling (`loss.drop_degenerate_groups`) the groups whose rewards are
        all equal are set aside and further question batches are drawn, each with its own key,
        until every process holds its share of groups with mixed rewards or
        `train.max_refill_batches` more batches were drawn; a batch still short is topped up with
        groups set aside (the loss masks them out).
        """
        dynamic, limit = self.loss_cfg.drop_degenerate_groups, self.config.train.max_refill_batches
        mixed, degenerate, refills = [], [], 0
        while True:
            examples = next(self.data_iter)
            with timed(times, "sample_s"):
                questions = rollout.question_tokens(self.tokenizer, examples)
                rollouts = policy.sample(questions, rollout_key(self.config.seed, int(self.state.step), refills))
            with timed(times, "score_s"):
                rewards_, _ = rollout.score(scorer, self.tokenizer, examples, rollouts)
            scored = rollout.ScoredGroups(examples, questions, rollouts, rewards_, self.config.sampling.group_size)
            if not dynamic:
                return scored, 0
            keep = scored.mixed()
            mixed.append(scored.take(np.flatnonzero(keep)))
            degenerate.append(scored.take(np.flatnonzero(~keep)))
            wanted = len(examples)
            short = int(sharding.agree_max([wanted - sum(len(g.examples) for g in mixed)])[0])  # over all processes
            if short <= 0 or refills == limit:
                everything = rollout.concat_groups(mixed + degenerate)
                return everything.take(np.arange(wanted)), refills
            refills += 1

    def train_step(self, scorer: rewards.Scorer) -> dict[str, float]:
        """One RL step: rollout -> batch -> update. Returns its metrics, with the seconds of each phase."""
        G = self.config.sampling.group_size
        times = {}
        with timed(times, "reshard_s"):
            policy = self.policy()
            jax.block_until_ready(policy.params)
        scored, refills = self.collect(policy, scorer, times)
        del policy  # one decode copy at a time: freed before the update
        examples, questions, rollouts, rewards_ = scored.examples, scored.questions, scored.rollouts, scored.rewards
        with timed(times, "build_s"):
            responses = rollout.responses(rollouts)
            answers, solutions = rollout.reference_tokens(self.tokenizer, examples,
                                                          max_tests_tokens=self.config.hindsight.max_tests_tokens)
            train_batch, peers, teacher = batch_lib.from_rollouts(
                self.template, questions, answers, solutions, rollouts, responses, rewards_,
                hindsight_cfg=self.config.hindsight, loss_cfg=self.loss_cfg,
                rng=step_rng(self.config.seed, STREAM_PEERS, int(self.state.step)),
            )
        with timed(times, "update_s"):
            placed = batch_lib.place(train_batch, self.mesh)
            self.state, metrics, credit = self.update(self.state, self.ref_params, placed)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        credit = sharding.global_to_host(credit)
        T_resp = credit.shape[1]
        # What the host metrics read, from every process (process 0 reports them).
        every = sharding.gather_rows(dict(
            rewards=rewards_, lengths=np.asarray(rollouts.lengths), truncated=np.asarray(rollouts.truncated),
            tau=hindsight.divergence_positions(responses, peers), credit=credit,
            mask=batch_lib.pad_to(train_batch.response_mask, T_resp), teacher_truncations=np.array([teacher.num_truncated]),
        ))
        failed_with_peer = (every["rewards"] < 1) & (every["tau"] >= 0)
        metrics.update(hindsight.credit_metrics(every["rewards"].reshape(-1, G), every["tau"], every["credit"], every["mask"]))
        if self.reporter is not None:
            self.reporter.add_credit_profile(
                hindsight.credit_profile(every["credit"], every["mask"], every["tau"], failed_with_peer))
        metrics.update(
            reward=float(every["rewards"].mean()),
            response_length=float(every["lengths"].mean()),
            truncated=float(every["truncated"].mean()),
            teacher_truncations=int(every["teacher_truncations"].sum()),
            refill_batches=refills,
            tokens_per_s=float(every["lengths"].sum() / sum(times.values())),
            **times,
        )
        return metrics

    def warm_up(self) -> None:
        """The supervised warm-up (warmup.py) on the run's validated training examples, then
        `start_from` the warmed-up policy, saved to <workdir>/warmup_policy (pi_0 on resume, and a
        shared starting point for other runs: `train.init_params`)."""
        c = self.config
        make_batch = partial(
            warmup.warmup_batch, tokenizer=self.tokenizer, template=self.template, eos_id=self.sampling_cfg.eos_ids[0],
            hindsight_cfg=c.hindsight, slip_rate=c.data.toy_slip_rate, rng=np.random.default_rng([c.seed, STREAM_WARMUP, 1]),
        )
        examples, _ = data.mixture_examples(self.train_files, self.tokenizer, max_prompt_len=c.data.max_prompt_len,
                                            template=c.data.template, enable_thinking=c.data.enable_thinking)
        warmup.require_solutions(examples)
        rows = warmup.rows_that_fit(examples, make_batch)
        if len(rows) < len(examples):
            logger.warning("sft warm-up: %d of %d rows skipped: their sequences exceed the largest bucket %d",
                           len(examples) - len(rows), len(examples), max(np.atleast_1d(c.hindsight.buckets)))
        steps = c.train.sft_warmup_steps
        with self.reporter.progress(steps, "sft warm-up") as bar:
            def on_step(done: int, loss: jax.Array) -> None:
                bar.update(1)
                if done % 50 == 0 or done == steps:
                    self.print(f"sft warm-up {done}/{steps} nll={float(loss):.4f}")

            params = warmup.sft_warmup(
                self.graphdef, self.state.params, rows, make_batch,
                steps=steps, learning_rate=c.train.sft_learning_rate,
                rows_per_step=c.data.questions_per_step * c.sampling.group_size // 2, chunk_size=self.loss_cfg.chunk_size,
                mesh=self.mesh, rng=np.random.default_rng([c.seed, STREAM_WARMUP]), on_step=on_step,
            )
        self.start_from(params)
        save_params(self.warmup_path, params)

    def start_from(self, params) -> None:
        """RL starts from `params` (warmed up, or `train.init_params`): fresh optimizer state (and
        EMA teacher); with a reference KL they are its pi_0."""
        self.state = init_state(params, self.optimizer, self.loss_cfg.teacher_ema > 0)
        if self.ref_params is not None:
            self.ref_params = jax.tree.map(jnp.copy, params)

    def policy(self) -> rollout.Policy:
        """The current policy for sampling, with its decode params (`decode_params`)."""
        return rollout.Policy(self.graphdef, self.decode_params(), self.template, self.tokenizer, self.sampling_cfg,
                              self.config.sampling.rows_per_call, self.mesh, self.config.sampling.engine)

    def evaluate(self, scorer: rewards.Scorer) -> dict[str, float]:
        """The eval sets' metrics (`evaluate.evaluate`: `eval/<set>/avg@n`, ..., `eval/accuracy`)."""
        return evaluate_policy(self.config, self.eval_sets, self.policy(), scorer, int(self.state.step),
                               self.reporter.progress).metrics

    def export(self, directory: str, dtype: str = "bfloat16") -> str:
        """The current policy as a Hugging Face directory (export.py); returns its path."""
        return export.export_policy(self.graphdef, self.state.params, self.tokenizer, self.sampling_cfg, directory, dtype)

    def checkpoint(self) -> None:
        step = int(self.state.step)
        self.checkpointer.save(step, self.state, self.data_iter.get_state(), self.config.to_dict())

    def resume(self) -> int | None:
        """Restores the latest checkpoint of the workdir, if any; returns its step."""
        step = self.checkpointer.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state, data_state, saved = self.checkpointer.restore(step, abstract)
        initial = self.config.train.init_params or self.warmup_path
        if self.ref_params is not None and os.path.isdir(initial):
            self.ref_params = restore_params(initial, abstract.params)
        self.data_iter.set_state(data_state)
        if saved.get("loss") != self.config.to_dict().get("loss"):
            logger.warning("resuming step %d with a different loss config than it was saved with", step)
        self.print(f"resumed from {self.checkpointer.manager.directory} at step {step}")
        return step

    def train(self) -> None:
        """Resume, or start from `train.init_params`, or warm up (and evaluate pi_0), then RL steps with eval, logging and checkpoints.

        Raises NonFiniteUpdates after `train.max_skipped_updates` consecutive skipped updates.
        """
        c = self.config
        self.print(
            f"hsd-jax: loss={c.loss.name} context={c.hindsight.context} model={self.model_cfg.num_hidden_layers} layers "
            f"x {self.model_cfg.hidden_size} ({qwen3.count_params(self.model_cfg) / 1e6:.1f}M params) "
            f"mesh={dict(self.mesh.shape)} workdir={self.workdir}"
        )
        resumed = self.resume()
        self.reporter = reporting.Reporter(self.workdir, c.train.steps, resume_step=resumed, enabled=self.is_main)
        try:
            limits = SandboxLimits(allow_same_uid=c.data.code_allow_same_uid)
            with rewards.Scorer(validation.verifiers(c), code_limits=limits) as scorer:
                if resumed is None:
                    if c.train.init_params:
                        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                self.state.params)
                        self.start_from(restore_params(os.path.abspath(c.train.init_params), abstract))
                        self.print(f"starting from the params in {c.train.init_params}")
                    elif c.train.sft_warmup_steps:
                        self.warm_up()
                    if c.train.eval_every:
                        self.reporter.log(0, self.evaluate(scorer))
                self.loop(scorer)
            if c.train.export_at_end:
                self.print(f"exported to {self.export(os.path.join(self.workdir, 'hf'))}")
        finally:
            self.checkpointer.wait()
            self.checkpointer.close()
            self.reporter.plot()
            self.reporter.close()

    def loop(self, scorer: rewards.Scorer) -> None:
        """RL steps from the current one to `train.steps`: update, eval, log, checkpoint, plots."""
        c, skipped = self.config, 0
        self.reporter.start_steps()
        with self.reporter.progress(c.train.steps, "rl steps", initial=int(self.state.step)) as bar:
            while int(self.state.step) < c.train.steps:
                metrics = self.train_step(scorer)
                step = int(self.state.step)
                bar.update(1)
                skipped = skipped + 1 if metrics["update_skipped"] else 0
                if skipped:
                    logger.warning("step %d: non-finite loss or gradient; the update was skipped (%d in a row)", step, skipped)
                if skipped >= c.train.max_skipped_updates:
                    raise NonFiniteUpdates(
                        f"stopped at step {step}: {skipped} consecutive updates had a non-finite loss or gradient "
                        f"(config.train.max_skipped_updates={c.train.max_skipped_updates}); the last checkpoint holds "
                        "the last finite state. Lower optimizer.learning_rate or check the data.")
                evaluated = c.train.eval_every and step % c.train.eval_every == 0
                if evaluated:
                    metrics.update(self.evaluate(scorer))
                if evaluated or step % c.train.log_every == 0 or step == c.train.steps:
                    self.reporter.log(step, metrics)
                if step % c.train.checkpoint_every == 0 or step == c.train.steps:
                    self.checkpoint()
                if evaluated:
                    self.reporter.plot()


def evaluate_policy(config: ml_collections.ConfigDict, eval_sets: list[evaluate.EvalSet], policy: rollout.Policy,
                    scorer, step: int, progress=None) -> evaluate.EvalReport:
    """`evaluate.evaluate` of `policy` on the validated examples of `eval_sets`, drawing from the
    eval stream at `step` (training's evaluation and --mode=eval alike)."""
    d = config.data
    examples_of = lambda eval_set: data.prompt_examples(
        [eval_set.path], eval_set.kind, policy.tokenizer, max_prompt_len=d.max_prompt_len, template=d.template,
        enable_thinking=d.enable_thinking)[0]
    return evaluate.evaluate(eval_sets, examples_of, policy, scorer, step_key(config.seed, STREAM_EVAL, step),
                             ks=tuple(config.train.eval_ks), progress=progress)


def train(config: ml_collections.ConfigDict) -> None:
    """Runs (or resumes) the training described by `config`."""
    Run(config).train()
