"""Training: the train state, the one jitted update, and the loop that wires the parts together.

The trainer modules are the only place that wires the pieces together (DESIGN.md, "Data flow"):

    rollout.py  examples --sampling.generate--> G rollouts per question --rewards.Scorer--> R
    batch.py    scored rollouts -> `TrainBatch` (student + teacher rows, targets, masks,
                advantages), shared with the warm-up; placement on the mesh
    warmup.py   supervised steps on reference solutions before RL (the toy task)
    trainer.py  config checks, model setup, `TrainState`, `update_step`, and `Run`:
                rollout -> batch -> update -> log / checkpoint, and evaluation

`update_step` (ONE jit) runs the teacher pass (stop-grad), the student pass (grad), the reference
pass and the fused chunked loss, then the optax update. It is pure over a `TrainState` pytree and
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
from hsd_jax import data, evaluate, hindsight, losses, reporting, rewards, rollout, sampling, sharding, validation, warmup
from hsd_jax.checkpoint import Checkpointer, restore_params, save_params
from hsd_jax.rewards.code import SandboxLimits
from models import hf, qwen3

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


def data_files(config: ml_collections.ConfigDict, workdir: str) -> tuple[list[str], list[str]]:
    """Train and eval files; the toy task writes its own into `workdir`."""
    d = config.data
    if d.kind == "toy":
        train = data.write_toy_dataset(os.path.join(workdir, "toy_train.jsonl"), d.toy_examples, config.seed)
        evals = data.write_toy_dataset(os.path.join(workdir, "toy_eval.jsonl"), 64, config.seed + 1, split="eval")
        return [train], [evals]
    return validation.split_files(d.train_files), validation.split_files(d.eval_files)


# ------------------------------------------------------------------------------------------------
# The jitted update
# ------------------------------------------------------------------------------------------------


def micro_batch_loss(params, teacher_params, ref_params, batch: batch_lib.TrainBatch, denominators, graphdef,
                     cfg: losses.LossConfig):
    """HSD / GRPO-family loss of one micro-batch of b rows and its metrics.

    denominators: `losses.loss_denominators` of the whole batch. The teacher pass (with
    `teacher_params`, stop-gradient) runs only when `cfg.needs_teacher`, the reference pass only
    when `cfg.beta > 0`.
    Returns (loss, (metrics, credit [b, T_resp])), credit 0 without a teacher.
    """
    targets, mask = batch.response_tokens, batch.response_mask
    student = batch_lib.response_hidden(graphdef, params, batch.student)
    head = batch_lib.lm_head(graphdef, params)
    chunked = dict(temperature=cfg.temperature, chunk_size=cfg.chunk_size)
    if cfg.needs_teacher:
        teacher_params = jax.lax.stop_gradient(teacher_params)
        teacher = batch_lib.response_hidden(graphdef, teacher_params, batch.teacher)
        out = losses.distill_divergence(
            teacher, student, head, targets, divergence=cfg.divergence, alpha=cfg.alpha, top_k=cfg.top_k,
            teacher_head=batch_lib.lm_head(graphdef, teacher_params), **chunked
        )
        logprobs, entropy, divergence, credit = out.logprobs, out.entropy, out.divergence, out.credit
    else:
        logprobs, entropy = losses.token_logprobs(student, head, targets, **chunked)
        divergence = credit = None
    ref_logprobs = None
    if cfg.beta > 0:
        ref = batch_lib.response_hidden(graphdef, ref_params, batch.student)
        ref_logprobs, _ = losses.token_logprobs(ref, batch_lib.lm_head(graphdef, ref_params), targets, **chunked)
        ref_logprobs = jax.lax.stop_gradient(ref_logprobs)
    inputs = losses.LossInputs(
        logprobs=logprobs,
        mask=mask,
        # One optimizer step per batch: the sampling policy is the current one, so the PPO ratio
        # is exactly 1 at the update (its gradient is A * grad log p), as in on-policy GRPO.
        old_logprobs=jax.lax.stop_gradient(logprobs),
        ref_logprobs=ref_logprobs,
        advantages=batch.advantages,
        divergence=divergence,
        distill_mask=batch.distill_mask,
        credit=credit,
        entropy=entropy,
    )
    loss, metrics = losses.objective(inputs, cfg, denominators=denominators)
    gap = jnp.abs(batch.sampler_logprobs - jax.lax.stop_gradient(logprobs)) * mask
    metrics["sampler_logprob_gap"] = gap.sum() / jnp.maximum(mask.sum(), 1.0)
    return loss, (metrics, jnp.zeros_like(logprobs) if credit is None else credit)


ADDITIVE_METRICS = ("loss", "pg_loss", "distill_loss", "ref_kl")
# Independent random streams, each folded with the step (see step_key / step_rng).
STREAM_SAMPLE, STREAM_PEERS, STREAM_EVAL, STREAM_WARMUP = range(4)


def update_step(
    state: TrainState,
    ref_params,
    batch: batch_lib.TrainBatch,
    *,
    graphdef,
    optimizer,
    cfg: losses.LossConfig,
    micro_batches: int,
    mesh=None,
):
    """One optimizer step over a whole batch of B rollouts, accumulated over `micro_batches`.

    Micro-batch m takes rows m, m + M, m + 2M, ... so that with the batch split over devices
    every micro-batch is too. Gradients accumulate in float32. A non-finite loss or gradient
    never reaches the parameters: the update is skipped (params and optimizer state stay as
    they were, bit for bit; the step still advances) and metrics["update_skipped"] is 1.
    The teacher reads the current params, or the EMA teacher's, which then moves toward the
    updated params: teacher <- (1 - cfg.teacher_ema) * teacher + cfg.teacher_ema * params.
    Returns (new state, metrics, per-token credit [B, T_resp] in the batch's row order).
    """
    teacher_params = state.params if state.teacher_params is None else state.teacher_params
    denominators = losses.loss_denominators(batch.response_mask, batch.distill_mask, cfg)
    split = jax.tree.map(lambda x: x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1), batch)
    grad_fn = jax.grad(micro_batch_loss, has_aux=True)

    def accumulate(grads, micro):
        micro = sharding.constrain_batch(micro, mesh)
        g, (metrics, credit) = grad_fn(state.params, teacher_params, ref_params, micro, denominators, graphdef, cfg)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), (metrics, credit)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, (metrics, credit) = jax.lax.scan(accumulate, zeros, split)
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
    new_state = TrainState(step=state.step + 1, params=params, opt_state=keep_finite(opt_state, state.opt_state),
                           teacher_params=teacher)
    return new_state, metrics, credit.swapaxes(0, 1).reshape(-1, credit.shape[-1])


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


def step_rng(seed: int, stream: int, step: int) -> np.random.Generator:
    """The host generator of `stream` at `step` (as `step_key`)."""
    return np.random.default_rng([seed, stream, step])


@contextlib.contextmanager
def timed(times: dict[str, float], name: str):
    """Sets `times[name]` to the seconds the block took."""
    start = time.perf_counter()
    yield
    times[name] = time.perf_counter() - start


class NonFiniteUpdates(RuntimeError):
    """`train.max_skipped_updates` consecutive updates had a non-finite loss or gradient."""


class Run:
    """One training run: the model, data, sampler, verifier, checkpoints and reports of `config`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = c = validation.resolve(config)
        self.loss_cfg = validation.validate(c)
        self.workdir = os.path.abspath(c.workdir)
        self.data_kind = "math" if c.data.kind == "toy" else c.data.kind
        self.train_files, self.eval_files = data_files(c, self.workdir)
        try:
            data.check_files(self.train_files, self.data_kind, "config.data.train_files")
            if self.eval_files:
                data.check_files(self.eval_files, self.data_kind, "config.data.eval_files")
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
        self.dataset, stats = data.prompt_dataset(
            self.train_files, self.data_kind, self.tokenizer,
            batch_size=c.data.questions_per_step // jax.process_count(), max_prompt_len=c.data.max_prompt_len,
            seed=c.seed, template=c.data.template, enable_thinking=c.data.enable_thinking,
        )
        self.print(f"data: {stats.summary()}")
        self.data_iter = iter(self.dataset)
        self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), c.train.max_to_keep)
        self.warmup_path = os.path.join(self.workdir, "warmup_policy")
        jit_options = dict(graphdef=self.graphdef, optimizer=self.optimizer, cfg=self.loss_cfg, mesh=self.mesh,
                           micro_batches=c.data.questions_per_step * c.sampling.group_size // c.train.micro_batch)
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
        if self.config.sampling.decode_layout == "train":
            return self.state.params
        dtype = jnp.dtype(self.model_cfg.dtype)
        cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, self.state.params)
        return sampling.sampling_params(cast, self.mesh)

    def sample(self, params, questions: list[np.ndarray], stream: int, n: int | None = None,
               progress=None) -> sampling.Rollouts:
        """n (default G) rollouts per question from `params`, with `stream`'s key at this step."""
        cfg = self.sampling_cfg if n is None else dataclasses.replace(self.sampling_cfg, n=n)
        key = step_key(self.config.seed, stream, int(self.state.step))
        return rollout.sample(self.graphdef, params, self.template, questions, key, cfg,
                              rows_per_call=self.config.sampling.rows_per_call, mesh=self.mesh, progress=progress)

    def train_step(self, scorer: rewards.Scorer) -> dict[str, float]:
        """One RL step: rollout -> batch -> update. Returns its metrics, with the seconds of each phase."""
        G = self.config.sampling.group_size
        times = {}
        with timed(times, "reshard_s"):
            params = jax.block_until_ready(self.decode_params())
        with timed(times, "sample_s"):
            examples = next(self.data_iter)
            questions = rollout.question_tokens(self.tokenizer, examples, self.data_kind)
            rollouts = self.sample(params, questions, STREAM_SAMPLE)
            del params  # one decode copy at a time: freed before the update
        with timed(times, "score_s"):
            rewards_, _ = rollout.score(scorer, self.tokenizer, examples, rollouts)
        with timed(times, "build_s"):
            responses = rollout.responses(rollouts)
            answers, solutions = rollout.reference_tokens(self.tokenizer, examples)
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
            tokens_per_s=float(every["lengths"].sum() / sum(times.values())),
            **times,
        )
        return metrics

    def warm_up(self) -> None:
        """The supervised warm-up (warmup.py) on the run's validated training examples, then fresh
        optimizer state; with a reference KL the warmed-up policy becomes its pi_0 (saved for resumes)."""
        c = self.config
        make_batch = partial(
            warmup.warmup_batch, tokenizer=self.tokenizer, template=self.template, eos_id=self.sampling_cfg.eos_ids[0],
            kind=self.data_kind, hindsight_cfg=c.hindsight,
        )
        examples, _ = data.prompt_examples(self.train_files, self.data_kind, self.tokenizer,
                                           max_prompt_len=c.data.max_prompt_len, template=c.data.template,
                                           enable_thinking=c.data.enable_thinking)
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
        self.state = init_state(params, self.optimizer, self.loss_cfg.teacher_ema > 0)
        if self.ref_params is not None:
            self.ref_params = jax.tree.map(jnp.copy, params)
            save_params(self.warmup_path, params)

    def evaluate(self, scorer: rewards.Scorer) -> dict[str, float]:
        """avg@n / pass@1 on the eval files' validated examples at the sampling temperature.

        Processes split the examples (a remainder smaller than the process count is left out)."""
        c, n = self.config, self.config.train.eval_samples
        examples, _ = data.prompt_examples(self.eval_files, self.data_kind, self.tokenizer,
                                           max_prompt_len=c.data.max_prompt_len, template=c.data.template,
                                           enable_thinking=c.data.enable_thinking)
        per_process = len(examples) // jax.process_count()  # each process evaluates its slice
        examples = examples[jax.process_index() * per_process : (jax.process_index() + 1) * per_process]
        questions = rollout.question_tokens(self.tokenizer, examples, self.data_kind)
        with self.reporter.progress(len(questions), "eval") as bar:
            rollouts = self.sample(self.decode_params(), questions, STREAM_EVAL, n=n, progress=bar.update)
        rewards_, _ = rollout.score(scorer, self.tokenizer, examples, rollouts)
        rewards_ = sharding.gather_rows(rewards_)
        return {f"eval/{k}": v for k, v in evaluate.summarize(rewards_.reshape(-1, n)).items()}

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
        if self.ref_params is not None and os.path.isdir(self.warmup_path):
            self.ref_params = restore_params(self.warmup_path, abstract.params)
        self.data_iter.set_state(data_state)
        if saved.get("loss") != self.config.to_dict().get("loss"):
            logger.warning("resuming step %d with a different loss config than it was saved with", step)
        self.print(f"resumed from {self.checkpointer.manager.directory} at step {step}")
        return step

    def train(self) -> None:
        """Resume or warm up (and evaluate pi_0), then RL steps with eval, logging and checkpoints.

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
            with rewards.Scorer(c.data.kind, code_limits=limits) as scorer:
                if resumed is None:
                    if c.train.sft_warmup_steps:
                        self.warm_up()
                    if c.train.eval_every:
                        self.reporter.log(0, self.evaluate(scorer))
                self.loop(scorer)
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


def train(config: ml_collections.ConfigDict) -> None:
    """Runs (or resumes) the training described by `config`."""
    Run(config).train()
