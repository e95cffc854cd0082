"""Defaults shared by every config: the paper's recipe (PAPER.md, "Training recipe").

Each config file defines `get_config(variant=None)`; the variant names a loss preset
(`configs/qwen3_8b.py:grpo`) and sets the matching teacher context. Any field can be swept from
the command line, e.g. `--config.loss.beta=1e-4 --config.optimizer.learning_rate=2e-6`.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from hsd_jax import losses

def loss_fields() -> ml_collections.ConfigDict:
    """`loss.name` plus every `LossConfig` field as an unset placeholder of its type.

    An unset field takes the value of the preset `loss.name` names when the run starts
    (`hsd_jax.validation.resolve`); setting it, in a config file or as
    `--config.loss.beta=1e-4`, overrides the preset.
    """
    fields = {"name": "hsd"}
    for name, value in dataclasses.asdict(losses.LossConfig()).items():
        kind = {"top_k": int, "dual_clip": float}.get(name, type(value))  # the two None defaults
        fields[name] = config_dict.placeholder(kind)
    return ml_collections.ConfigDict(fields)


def base_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe for loss preset `variant` (default "hsd")."""
    name = variant or "hsd"
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/" + name

    # Model: a local HF directory (`path`), or random weights of `preset` / the `arch` fields.
    c.model = ml_collections.ConfigDict(
        # float32 master weights (a 1e-6 step vanishes in bfloat16), bfloat16 compute
        dict(path="", preset="", arch=ml_collections.ConfigDict(), param_dtype="float32", dtype="bfloat16", remat="full")
    )
    c.tokenizer_path = ""  # defaults to model.path

    c.data = ml_collections.ConfigDict(
        dict(
            kind="math",  # math | code | toy
            # comma-separated JSONL/Parquet files of data.kind's rows; prefix other kinds' with
            # 'math=' / 'code=' (e.g. "m.jsonl,code=c.jsonl")
            train_files="",
            # comma-separated, prefixed like train_files; FILE:avg@16 (16 samples, temperature 1, no
            # top-p) or FILE:greedy picks a file's decoding, plain FILE samples train.eval_samples at
            # the run's settings
            eval_files="",
            # kinds per step, e.g. "math:4,code:1" (the paper's mix; each step holds each kind's share
            # of questions_per_step, rounded); "" = data.kind only. kind=toy: toy math and toy code
            mixture="",
            questions_per_step=128,
            max_prompt_len=1024,
            template="chat",
            enable_thinking=True,
            toy_examples=0,  # kind=toy: problems generated into the workdir
            # kind=toy: the warm-up's student also learns each solution as written with slips (each
            # line's arrow wrong with this probability, data.toy_walk; warmup.warmup_batch)
            toy_slip_rate=0.0,
            # code rows: run model-written programs under this process's own uid where the machine
            # cannot give them one of their own (not root); they could then signal its processes
            code_allow_same_uid=False,
        )
    )
    c.sampling = ml_collections.ConfigDict(
        dict(group_size=8, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=4096, cache_dtype="bfloat16",
             rows_per_call=256,  # rollouts generated per sampler call (bounds the KV cache)
             # "tensor": decode from a tensor-parallel copy of the weights made before each rollout
             # phase (reshard_s); "train": decode from the training (FSDP) layout, no copy
             decode_layout="tensor",
             # "static": sampling.generate, rows_per_call rows decode until the longest ends;
             # "continuous": sampling.generate_continuous, rows_per_call decode slots refilled as
             # rows end (the same tokens for the same seed; faster on long-tailed lengths); one process
             engine="static")
    )
    c.loss = loss_fields()
    c.loss.name = name
    # Tied to the sampler: logprobs are of the distribution it drew from, lengths its limit.
    c.loss.max_response_length = c.sampling.get_ref("max_new_tokens")
    c.loss.temperature = c.sampling.get_ref("temperature")
    c.hindsight = ml_collections.ConfigDict(
        dict(
            # unset: the loss preset's teacher (validation.TEACHERS)
            context=config_dict.placeholder(str),
            peer_rule=config_dict.placeholder(str),
            max_teacher_len=4096 + 1024 + 4096 + 512,
            # code rows: HSD's reference a* is the unit-test bundle as text, cut to whole tests
            # within this many tokens (rewards.code.render_tests)
            max_tests_tokens=1024,
            # HSD's teacher reads the peer's whole path, reasoning included; SDPO strips it
            strip_think=config_dict.placeholder(bool),
            # student/teacher/response lengths pad to the smallest bucket that fits: few shapes, few compiles
            buckets=(256, 512, 1024, 2048, 4096, 8192, 16384),
            template=ml_collections.ConfigDict(),  # overrides of hindsight.TeacherTemplate's text pieces
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(learning_rate=1e-6, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
    )
    c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
    c.train = ml_collections.ConfigDict(
        dict(
            steps=1500,
            micro_batch=8,  # rollouts per forward/backward; gradients accumulate over the step
            # PPO updates per rollout batch: ppo_epochs passes over minibatches_per_step minibatches,
            # one optimizer step each (unset: the preset's published count, validation.MINIBATCHES)
            ppo_epochs=1,
            minibatches_per_step=config_dict.placeholder(int),
            # DAPO dynamic sampling: at most this many extra question batches per step to fill the
            # batch with groups of mixed rewards (loss.drop_degenerate_groups)
            max_refill_batches=10,
            sft_warmup_steps=0,  # supervised steps on reference solutions before RL (toy task)
            # start RL from these params (e.g. another run's <workdir>/warmup_policy) instead of
            # the model's weights and the warm-up
            init_params="",
            sft_learning_rate=1e-3,
            log_every=1,
            checkpoint_every=50,
            max_to_keep=3,
            eval_every=0,
            eval_samples=16,  # samples per question of an eval file without a decoding suffix
            eval_ks=(1,),  # pass@k reported for each k (up to each eval set's sample count)
            export_at_end=True,  # the final policy as a Hugging Face directory in <workdir>/hf (bfloat16)
            max_skipped_updates=5,  # consecutive non-finite updates (each skipped) that stop the run
        )
    )
    return c
