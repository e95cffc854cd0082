"""Memory plan of a run (`main.py --dry_run`): per-device bytes, built abstractly, no weight allocated.

`report(config)` builds what a run holds on each device without creating a single weight: the
params, optimizer state and reference params as `jax.ShapeDtypeStruct`s in their NamedShardings
on the configured mesh (`qwen3.abstract_model`; the optimizer state placed where compiling
`trainer.init_state` as the trainer jits it puts it), then compiles ahead of time
(`jax.jit(f).lower(*abstract).compile()`):
- the update step on an abstract `TrainBatch` of the configured shapes: B = questions_per_step x
  group_size rows, student rows of bucket(max_prompt_len + max_new_tokens) tokens, teacher rows of
  bucket(max_teacher_len), responses of bucket(max_new_tokens), micro-batches of train.micro_batch;
- the sampler (prefill + decode loop, one program) at sampling.rows_per_call rows per process,
  prompts of the bucket holding max_prompt_len and a KV cache of prompt + max_new_tokens - 1 slots.
From `compiled.memory_analysis()` it reads each program's argument, output, aliased (donated) and
temporary bytes, and prints them beside the analytic sizes, with each phase's peak:

    update phase   = state + reference + batch (the arguments) + outputs not donated + temporaries
    sampling phase = state + reference + a sampling-layout params copy (if planned) + the
                     sampler's inputs, outputs and temporaries (the KV cache lives in these)

and the headroom of the larger one against `device_memory_gib`.

Accuracy. The temporaries are what XLA's buffer assignment reserves on the compiling backend. On
CPU (a mesh of N devices simulated with XLA_FLAGS=--xla_force_host_platform_device_count=N, set
before jax is imported) they estimate, not measure, an accelerator's: XLA:CPU runs bfloat16
matmuls in float32 and fuses differently. One difference is too large to leave: plain causal
attention (`jax.nn.dot_product_attention`, the training passes) is a fused kernel on GPUs (cuDNN
flash attention, O(B T N H) memory) but XLA ops holding [B, N, T, T] scores on CPU and TPU.
`attention="fused"` (default) compiles the update with a stand-in of the fused kernel's footprint
when compiling on CPU; `attention="xla"` compiles it as XLA runs it (the TPU figure).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from functools import partial
from typing import Any, Callable
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hsd_jax import batch as batch_lib
from hsd_jax import hindsight, sampling, sharding, trainer, validation
from hsd_jax._models import qwen3

GIB = 2**30
ATTENTION_FOOTPRINTS = ("fused", "xla")
HEADROOM = 0.10  # the share of device memory a plan keeps free to count as fitting
ATTENTION_NOTES = {
    "fused": "training attention is counted at a fused kernel's O(B*T*N*H) footprint (cuDNN flash on GPU).",
    "xla": "training attention is counted as XLA runs it, with [B, N, T, T] scores (TPU, CPU).",
}


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """Per-device bytes of one ahead-of-time compiled program (`compiled.memory_analysis()`).

    arguments: inputs; outputs: results; aliased: outputs written into donated inputs;
    temporaries: everything else XLA reserves while it runs; seconds: lower + compile time.
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    seconds: float

    @property
    def peak(self) -> int:
        """Bytes live while the program runs: inputs, fresh outputs and temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_program(jitted, *args, **kwargs) -> CompiledProgram:
    """Lowers and compiles `jitted` on abstract arguments and reads its memory analysis."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return CompiledProgram(
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes, seconds=seconds,
    )


# ------------------------------------------------------------------------------------------------
# Abstract state
# ------------------------------------------------------------------------------------------------


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded arrays or `ShapeDtypeStruct`s (the largest
    shard when shards differ). `None` leaves count 0."""
    per_device: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def abstract(tree: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `tree`'s leaves placed with the matching `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(model_cfg: qwen3.Qwen3Config, mesh, rules=None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of `model_cfg` as sharded `ShapeDtypeStruct`s: the layout of `rules`
    (default: the training rules) on `mesh`; nothing is initialised."""
    graphdef, shapes = nnx.split(qwen3.abstract_model(model_cfg))
    return graphdef, abstract(shapes, sharding.state_shardings(shapes, mesh, rules))


def abstract_train_state(params: nnx.State, optimizer, ema_teacher: bool = False) -> trainer.TrainState:
    """The `TrainState` the trainer creates from `params`, placed as `trainer.init_state` places
    it (`trainer.train_state_shardings`), as `ShapeDtypeStruct`s."""
    shapes = jax.eval_shape(partial(trainer.fresh_state, optimizer=optimizer, ema_teacher=ema_teacher), params)
    return abstract(shapes, trainer.train_state_shardings(params, optimizer, ema_teacher))


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The padded shapes of one step (hindsight buckets, sampler prompt buckets).

    rows: B rollouts per step; student / teacher / response: padded lengths of the update's rows;
    micro_batch: rows per micro-batch; prompts: P prompts per sampler call, global (each process
    sends rows_per_call / G of its questions); sampler_rows: P x G; prompt: the sampler's prompt
    bucket; cache_slots: prompt + M - 1.
    """

    rows: int
    student: int
    teacher: int
    response: int
    micro_batch: int
    prompts: int
    sampler_rows: int
    prompt: int
    cache_slots: int


def step_shapes(config: ml_collections.ConfigDict, processes: int = 1) -> Shapes:
    """The largest shapes a step of `config` pads to (every row at its length limit), with
    `processes` JAX processes each sampling its share of the questions."""
    c, s = config, config.sampling
    bucket = partial(hindsight.bucket_length, buckets=tuple(c.hindsight.buckets))
    per_process = max(1, s.rows_per_call // (s.group_size * processes))  # rows_per_call is global
    prompts = min(per_process, c.data.questions_per_step // processes) * processes
    prompt = sampling.prompt_bucket(c.data.max_prompt_len, sampling.DEFAULT_BUCKETS)
    return Shapes(
        rows=c.data.questions_per_step * s.group_size,
        student=bucket(c.data.max_prompt_len + s.max_new_tokens),
        teacher=bucket(c.hindsight.max_teacher_len),
        response=bucket(s.max_new_tokens),
        micro_batch=c.train.micro_batch,
        prompts=prompts,
        sampler_rows=prompts * s.group_size,
        prompt=prompt,
        cache_slots=prompt + s.max_new_tokens - 1,
    )


def abstract_batch(shapes: Shapes, mesh) -> batch_lib.TrainBatch:
    """A `TrainBatch` of `ShapeDtypeStruct`s split over the batch axes of `mesh`, as placed by
    `batch.place`."""

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), batch_size=shape[0]))

    B, R = shapes.rows, shapes.response
    rows = lambda T: batch_lib.ModelRows(array((B, T), jnp.int32), array((B, T), jnp.int32), array((B, R), jnp.int32))
    return batch_lib.TrainBatch(
        student=rows(shapes.student), teacher=rows(shapes.teacher),
        response_tokens=array((B, R), jnp.int32), response_mask=array((B, R), jnp.float32),
        distill_mask=array((B,), jnp.float32), advantages=array((B,), jnp.float32),
        sampler_logprobs=array((B, R), jnp.float32),
    )


def kv_cache(model_cfg: qwen3.Qwen3Config, rows: int, slots: int, cache_dtype: str | None, mesh) -> qwen3.KVCache:
    """The sampler's KV cache of `rows` x `slots` as sharded `ShapeDtypeStruct`s (sampling rules)."""
    shapes = jax.eval_shape(lambda: qwen3.KVCache.init(model_cfg, rows, slots, cache_dtype))
    place = lambda x, axes: sharding.named_sharding(x.shape, axes, mesh, sampling.SAMPLING_RULES)
    return jax.tree.map(lambda x, axes: abstract(x, place(x, axes)), shapes, qwen3.KVCache(**qwen3.KVCache.AXES))


# ------------------------------------------------------------------------------------------------
# The compiled programs
# ------------------------------------------------------------------------------------------------


def fused_attention_footprint(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Planning stand-in for a fused causal attention kernel: q [B, T, N, H], k, v [B, T, K, H] ->
    [B, T, N, H] by an elementwise map, so that forward and backward hold O(B T N H) bytes, as
    cuDNN's flash attention does. Its values mean nothing: it is only ever compiled."""
    groups = q.shape[2] // k.shape[2]
    return q * jnp.repeat(k, groups, axis=2) + jnp.repeat(v, groups, axis=2)


@contextlib.contextmanager
def attention_footprint(attention: str):
    """While tracing: the training attention at the footprint `attention` names (see module doc).
    "fused" on a CPU backend swaps `fused_attention_footprint` in for `qwen3.causal_attention`
    (the plain causal case); masked attention (the sampler's) and other backends are left as they are."""
    if attention not in ATTENTION_FOOTPRINTS:
        raise ValueError(f"attention={attention!r}: use one of {ATTENTION_FOOTPRINTS}.")
    if attention == "xla" or jax.default_backend() != "cpu":
        yield
        return
    with mock.patch.object(qwen3, "causal_attention", fused_attention_footprint):
        yield


def compile_update(config, graphdef, state, ref_params, batch, optimizer, mesh, attention: str) -> CompiledProgram:
    """The trainer's jitted update step (state donated), compiled on abstract arguments."""
    loss_cfg = validation.loss_config(config)
    minibatches = config.train.minibatches_per_step
    micro_batches = batch.response_mask.shape[0] // config.train.micro_batch // minibatches
    update = partial(trainer.update_step, graphdef=graphdef, optimizer=optimizer, cfg=loss_cfg,
                     micro_batches=micro_batches, minibatches=minibatches, epochs=config.train.ppo_epochs, mesh=mesh)
    with attention_footprint(attention):
        return compile_program(jax.jit(update, donate_argnums=0), state, ref_params, batch)


def sampling_config(config: ml_collections.ConfigDict) -> sampling.SamplingConfig:
    """The sampler settings of `config.sampling` (end-of-sequence ids do not change the program)."""
    s = config.sampling
    return sampling.SamplingConfig(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
        n=s.group_size, cache_dtype=s.cache_dtype, eos_ids=(0,),
    )


def compile_sampler(config, graphdef, params, shapes: Shapes, mesh) -> CompiledProgram:
    """`sampling.generate`'s program (prefill + decode loop) for P prompts of the prompt bucket."""
    rules = sampling.SAMPLING_RULES
    prompts = lambda *shape: jax.ShapeDtypeStruct(
        shape, jnp.int32, sharding=sharding.batch_sharding(mesh, len(shape), rules, batch_size=shape[0])
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    rules_items = tuple(sorted((k, tuple(v)) for k, v in rules.items()))
    return compile_program(
        sampling._generate_jit, graphdef, params, prompts(shapes.prompts, shapes.prompt), prompts(shapes.prompts), key,
        None, config=sampling_config(config), mesh=mesh, rules_items=rules_items,  # None: no forced lengths
    )


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


def model_config(config: ml_collections.ConfigDict) -> qwen3.Qwen3Config:
    """The run's architecture and dtypes, as the trainer sets them, without loading a weight: a
    checkpoint's config.json, a preset, or `model.arch` (whose vocabulary the tokenizer sizes)."""
    m = config.model
    tokenizer = None if m.path or m.preset else trainer.load_tokenizer(config, os.path.abspath(config.workdir))
    return trainer.model_config(config, tokenizer)


def plan(config: ml_collections.ConfigDict, attention: str = "fused", sampler_rules: dict | None = None) -> dict[str, Any]:
    """Every number of the memory plan of a resolved `config` (per-device bytes, seconds).

    sampler_rules: the layout of the decode copy of the params, held beside the train state while
    sampling, in the compute dtype (`trainer.Run.decode_params`); default: SAMPLING_RULES when
    `sampling.decode_layout="tensor"`, no copy (the sampler reads the train params) for "train".
    """
    if sampler_rules is None and config.sampling.decode_layout == "tensor":
        sampler_rules = sampling.SAMPLING_RULES
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    model_cfg = model_config(config)
    shapes = step_shapes(config, jax.process_count())
    optimizer = trainer.make_optimizer(config)
    graphdef, params = abstract_params(model_cfg, mesh)
    state = abstract_train_state(params, optimizer, validation.loss_config(config).teacher_ema > 0)
    ref_params = state.params if validation.loss_config(config).beta > 0 else None
    batch = abstract_batch(shapes, mesh)
    update = compile_update(config, graphdef, state, ref_params, batch, optimizer, mesh, attention)
    decode_cfg = dataclasses.replace(model_cfg, param_dtype=model_cfg.dtype)
    sampler_params = state.params if sampler_rules is None else abstract_params(decode_cfg, mesh, sampler_rules)[1]
    sampler = compile_sampler(config, graphdef, sampler_params, shapes, mesh)
    cache = kv_cache(model_cfg, shapes.sampler_rows, shapes.cache_slots, config.sampling.cache_dtype, mesh)
    held = per_device_bytes((state, ref_params))
    counted_in_held = per_device_bytes(state.params) if sampler_rules is None else 0
    phases = dict(update=update.peak, sampling=held + sampler.peak - counted_in_held)
    return dict(
        mesh=dict(mesh.shape), devices=mesh.size, remat=model_cfg.remat, attention=attention,
        backend=jax.default_backend(), params_count=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        shapes=dataclasses.asdict(shapes),
        bytes=dict(
            params=per_device_bytes(state.params),
            optimizer_state=per_device_bytes(state.opt_state),
            reference_params=per_device_bytes(ref_params),
            batch=per_device_bytes(batch),
            update_temporaries=update.temporaries,
            update_outputs_not_aliased=update.outputs - update.aliased,
            sampling_params=per_device_bytes(sampler_params) - counted_in_held,
            kv_cache=per_device_bytes(cache),
            sampler_temporaries=sampler.temporaries,
            update_phase=phases["update"],
            sampling_phase=phases["sampling"],
            peak=max(phases.values()),
        ),
        compile_seconds=dict(update=update.seconds, sampler=sampler.seconds),
    )


def headroom(peak: int, device_memory_gib: float) -> float:
    """The share of `device_memory_gib` left free at `peak` bytes (negative when it does not fit)."""
    return 1 - peak / (device_memory_gib * GIB)


def accuracy_note(backend: str, attention: str) -> str:
    """How the compiled temporaries relate to the accelerator's (printed under the table)."""
    if backend != "cpu":
        return f"Temporaries as XLA:{backend.upper()} compiled them for this device kind."
    return ("Temporaries compiled by XLA:CPU estimate the accelerator's: CPU runs bfloat16 matmuls in float32 and "
            "fuses and schedules differently; " + ATTENTION_NOTES[attention])


def format_table(result: dict[str, Any]) -> str:
    """A `report` result as a text table of GiB per device, with the headroom and the accuracy note."""
    b, s, memory = result["bytes"], result["shapes"], result["device_memory_gib"]
    rows = [
        ("params", b["params"], ""),
        ("optimizer state", b["optimizer_state"], ""),
        ("reference params", b["reference_params"], "loss.beta > 0" if b["reference_params"] else "loss.beta = 0: none"),
        ("train batch", b["batch"], f"{s['rows']} rows; student {s['student']}, teacher {s['teacher']} tokens"),
        ("update temporaries", b["update_temporaries"], f"micro-batches of {s['micro_batch']} rows"),
        ("update outputs (not donated)", b["update_outputs_not_aliased"], ""),
        ("sampling params copy", b["sampling_params"], "" if b["sampling_params"] else "none: the sampler reads the train params"),
        ("KV cache", b["kv_cache"], f"{s['sampler_rows']} rows x {s['cache_slots']} slots (inside sampler temporaries)"),
        ("sampler temporaries", b["sampler_temporaries"], f"{s['prompts']} prompts of {s['prompt']} tokens per call"),
        ("update phase", b["update_phase"], "state + ref + batch + update outputs + temporaries"),
        ("sampling phase", b["sampling_phase"], "state + ref + params copy + sampler temporaries"),
        ("peak", b["peak"], f"of {memory:g} GiB"),
        ("headroom", memory * GIB - b["peak"],
         f"{result['headroom']:.1%}: " + ("fits" if result["fits"] else f"does NOT fit with {HEADROOM:.0%} free")),
    ]
    seconds = result["compile_seconds"]
    return "\n".join([
        f"memory plan: {result['params_count'] / 1e6:,.1f}M params, mesh {result['mesh']} ({result['devices']} devices), "
        f"remat={result['remat']}",
        f"{'per device':30s} {'GiB':>9s}",
        *(f"{name:30s} {n / GIB:9.2f}  {note}" for name, n, note in rows),
        f"compile: update {seconds['update']:.1f} s, sampler {seconds['sampler']:.1f} s",
        accuracy_note(result["backend"], result["attention"]),
    ])


def report(
    config: ml_collections.ConfigDict,
    device_memory_gib: float = 80.0,
    attention: str = "fused",
    sampler_rules: dict | None = None,
    print_fn: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """The dry run of `main.py --dry_run`: plans a resolved `config` (see `plan` and the module
    doc), prints the table with `print_fn` and returns the plan with `device_memory_gib`,
    `headroom` (the share of it left at the peak) and `fits` (headroom >= 10 %)."""
    result = plan(config, attention, sampler_rules)
    left = headroom(result["bytes"]["peak"], device_memory_gib)
    result.update(device_memory_gib=device_memory_gib, headroom=left, fits=left >= HEADROOM)
    print_fn(format_table(result))
    return result
