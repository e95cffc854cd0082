"""Defaults shared by every config: the paper's recipe (PAPER.md, "Training recipe").

Each config file defines `get_config(variant=None)`; the variant names a loss preset
(`configs/qwen3_8b.py:grpo`) and sets the matching teacher context. Any field can be swept from
the command line, e.g. `--config.loss.beta=1e-4 --config.optimizer.learning_rate=2e-6`.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from hsd_jax import losses

# The teacher's privileged context and peer rule each loss preset implies (PAPER.md, baselines).
CONTEXTS = {
    "hsd": ("peer_answer", "uniform"),
    "opsd": ("answer", "uniform"),
    "grpo_opsd": ("answer", "uniform"),
    "sdpo": ("peer", "first"),
    "rlsd": ("answer", "uniform"),  # the teacher of RLSD's token weights sees the reference answer
}


def loss_config(name: str) -> ml_collections.ConfigDict:
    """The preset's `LossConfig` fields (None-valued ones as typed placeholders) plus its name."""
    fields = dataclasses.asdict(losses.preset(name))
    fields["top_k"] = config_dict.placeholder(int) if fields["top_k"] is None else fields["top_k"]
    fields["dual_clip"] = config_dict.placeholder(float) if fields["dual_clip"] is None else fields["dual_clip"]
    return ml_collections.ConfigDict({"name": name, **fields})


def base_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe for loss preset `variant` (default "hsd")."""
    name = variant or "hsd"
    context, peer_rule = CONTEXTS.get(name, ("none", "uniform"))
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
            train_files="",  # comma-separated JSONL/Parquet files
            eval_files="",
            questions_per_step=128,
            max_prompt_len=1024,
            template="chat",
            enable_thinking=True,
            toy_examples=0,  # kind=toy: problems generated into the workdir
        )
    )
    c.sampling = ml_collections.ConfigDict(
        dict(group_size=8, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=4096, cache_dtype="bfloat16",
             rows_per_call=256)  # rollouts generated per sampler call (bounds the KV cache)
    )
    c.loss = loss_config(name)
    # Tied to the sampler: logprobs are of the distribution it drew from, lengths its limit.
    c.loss.max_response_length = c.sampling.get_ref("max_new_tokens")
    c.loss.temperature = c.sampling.get_ref("temperature")
    c.hindsight = ml_collections.ConfigDict(
        dict(
            context=context,
            peer_rule=peer_rule,
            max_teacher_len=4096 + 1024 + 4096 + 512,
            strip_think=False,  # HSD's teacher reads the peer's whole path, reasoning included
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
            sft_warmup_steps=0,  # supervised steps on reference solutions before RL (toy task)
            sft_learning_rate=1e-3,
            log_every=1,
            checkpoint_every=50,
            max_to_keep=3,
            eval_every=0,
            eval_samples=16,
        )
    )
    return c
