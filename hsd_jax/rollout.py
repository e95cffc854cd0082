"""Rollouts of one batch of questions, on the host side of a step: encode, sample, score.

    examples --question_tokens--> Q questions --sample--> Q * G rollouts (host arrays)
      --responses--> B token arrays --score--> rewards [B]

Rows are group-major: rollout `b` answers question `b // G`. Sampling runs one of two engines
(`config.sampling.engine`), both bounding the KV cache at `rows_per_call` rows: "static", the
jitted `sampling.generate` at most `rows_per_call` rows at a time; "continuous",
`sampling.generate_continuous` over all rows with `rows_per_call` decode slots refilled as rows
end. For the same key both draw the same tokens (to float rounding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hsd_jax import data, hindsight, rewards, sampling, sharding
from hsd_jax.rewards import code

ENGINES = ("static", "continuous")  # config.sampling.engine


def sampling_config(sampling_cfg: ml_collections.ConfigDict, tokenizer) -> sampling.SamplingConfig:
    """The sampler settings of `config.sampling`; rows end at any of the tokenizer's end tokens."""
    s = sampling_cfg
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    eos = tuple(sorted({i for i in eos if i is not None and i != tokenizer.unk_token_id} | {tokenizer.eos_token_id}))
    return sampling.SamplingConfig(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
        eos_ids=eos, n=s.group_size, cache_dtype=s.cache_dtype, pad_id=tokenizer.pad_token_id or 0,
    )


def question_tokens(tokenizer, examples: Sequence[dict], kind: str = "math") -> list[np.ndarray]:
    """The user-turn content of each example (question + its kind's instruction), encoded. An
    example's kind is its "kind" field (`data.encode_prompts` sets it), else `kind`."""
    contents = [data.user_content(ex["question"], ex.get("kind", kind)) for ex in examples]
    return hindsight.encode_texts(tokenizer, contents)


def reference_text(example: dict, max_tests_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """HSD's reference a* of an example: a code row's unit tests as text (`code.render_tests`, at
    most `max_tests_tokens` tokens as `count_tokens` counts them), else its answer ("" if none)."""
    if "tests" in example:
        spec = code.normalize_tests(example["tests"], example.get("fn_name"))
        return code.render_tests(spec, max_tests_tokens, count_tokens)
    return str(example.get("answer", ""))


def reference_tokens(tokenizer, examples: Sequence[dict], *,
                     max_tests_tokens: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """(references, solutions) of the examples, encoded: `reference_text` (answers; code rows'
    tests within `max_tests_tokens`), and None for a missing solution."""
    count = lambda text: len(tokenizer.encode(text))
    references = [reference_text(ex, max_tests_tokens, count) for ex in examples]
    return hindsight.encode_texts(tokenizer, references), hindsight.encode_texts(tokenizer, [ex.get("solution") for ex in examples])


def sample(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    template: hindsight.TemplateTokens,
    questions: Sequence[np.ndarray],
    key: jax.Array,
    cfg: sampling.SamplingConfig,
    *,
    rows_per_call: int,
    mesh: jax.sharding.Mesh,
    engine: str = "static",
    progress: Callable[[int], Any] | None = None,
) -> sampling.Rollouts:
    """`cfg.n` rollouts of each question's student prompt, as host (NumPy) `sampling.Rollouts` [Q * n]
    (row b answers question `prompt_index[b]` = b // n).

    Multi-process ("static" only): `questions` are this process's (the same count on every
    process) and so are the returned rows; the sampler runs on the global batch.

    "static": questions go to the sampler `max(1, rows_per_call // cfg.n)` at a time over all
    processes (each sends its share; the KV cache is the same whatever the process count); the
    call starting at question i draws with `fold_in(key, i)`. "continuous": one call with that
    many questions' rows as decode slots, each row drawing with the key the static call holding
    it would use. progress(questions_done) runs after each call.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: use one of {', '.join(ENGINES)}.")
    prompts = [hindsight.student_prompt(template, q) for q in questions]
    per_call = max(1, rows_per_call // (cfg.n * jax.process_count()))  # rows_per_call counts all processes
    starts = range(0, len(prompts), per_call)
    if engine == "continuous":
        keys = jnp.concatenate([sampling.row_keys(jax.random.fold_in(key, i), len(prompts[i : i + per_call]) * cfg.n)
                                for i in starts])
        out, _ = sampling.generate_continuous(graphdef, params, prompts, keys, cfg, slots=min(per_call, len(prompts)) * cfg.n,
                                                mesh=mesh)
        if progress is not None:
            progress(len(prompts))
        return jax.device_get(out)
    chunks = []
    for i in starts:
        part = prompts[i : i + per_call]
        chunks.append(sampling.generate(graphdef, params, part, jax.random.fold_in(key, i), cfg, mesh=mesh))
        if progress is not None:
            progress(len(part))
    out = jax.tree.map(lambda *parts: np.concatenate([sharding.global_to_host(p) for p in parts]), *chunks)
    return dataclasses.replace(out, prompt_index=np.repeat(np.arange(len(prompts), dtype=np.int32), cfg.n))


def responses(rollouts: sampling.Rollouts) -> list[np.ndarray]:
    """The generated tokens of each row up to its length (its EOS included): B arrays."""
    tokens, lengths = np.asarray(rollouts.tokens), np.asarray(rollouts.lengths)
    return [tokens[b, : lengths[b]] for b in range(len(lengths))]


def score(
    scorer: rewards.Scorer, tokenizer, examples: Sequence[dict], rollouts: sampling.Rollouts
) -> tuple[np.ndarray, list[str]]:
    """Verifier rewards [B] in {0, 1} of the decoded responses (0 for truncated rows) and B reasons."""
    texts = tokenizer.batch_decode(responses(rollouts), skip_special_tokens=True)
    return scorer(examples, texts, truncated=np.asarray(rollouts.truncated))


@dataclasses.dataclass
class ScoredGroups:
    """Q questions with their G scored rollouts each; rows group-major (row b answers question b // G).

    examples: Q data rows; questions: Q encoded user turns; rollouts: host `sampling.Rollouts`
    [Q * G] (`prompt_index` = b // G); rewards: [Q * G] verifier rewards; group_size: G.
    """

    examples: list[dict]
    questions: list[np.ndarray]
    rollouts: sampling.Rollouts
    rewards: np.ndarray
    group_size: int

    def mixed(self) -> np.ndarray:
        """[Q] bool: the group's rewards are not all equal (DAPO keeps only these)."""
        r = self.rewards.reshape(len(self.examples), self.group_size)
        return (r != r[:, :1]).any(axis=1)

    def take(self, groups: Sequence[int]) -> ScoredGroups:
        """The groups at the indices `groups`, in that order."""
        G = self.group_size
        rows = (np.asarray(groups, np.int64)[:, None] * G + np.arange(G)).reshape(-1)
        rollouts = jax.tree.map(lambda x: np.asarray(x)[rows], self.rollouts)
        rollouts = dataclasses.replace(rollouts, prompt_index=np.repeat(np.arange(len(groups), dtype=np.int32), G))
        return ScoredGroups([self.examples[q] for q in groups], [self.questions[q] for q in groups], rollouts,
                            self.rewards[rows], G)


def concat_groups(parts: Sequence[ScoredGroups]) -> ScoredGroups:
    """The groups of `parts` one after another (equal group sizes and rollout widths)."""
    G = parts[0].group_size
    rollouts = jax.tree.map(lambda *xs: np.concatenate(xs), *[p.rollouts for p in parts])
    groups = sum(len(p.examples) for p in parts)
    rollouts = dataclasses.replace(rollouts, prompt_index=np.repeat(np.arange(groups, dtype=np.int32), G))
    return ScoredGroups([ex for p in parts for ex in p.examples], [q for p in parts for q in p.questions], rollouts,
                        np.concatenate([p.rewards for p in parts]), G)


@dataclasses.dataclass(frozen=True)
class Policy:
    """What sampling from a model needs: its graphdef and decode params, the chat template's
    tokens, the tokenizer, the run's sampler settings, the rows per sampler call, the mesh and the
    sampling engine ("static" | "continuous"). Training's evaluation, --mode=eval and
    --mode=sample sample through it."""

    graphdef: nnx.GraphDef
    params: nnx.State
    template: hindsight.TemplateTokens
    tokenizer: Any
    sampling_cfg: sampling.SamplingConfig
    rows_per_call: int
    mesh: jax.sharding.Mesh
    engine: str

    def sample(self, questions: Sequence[np.ndarray], key: jax.Array, cfg: sampling.SamplingConfig | None = None,
               progress: Callable[[int], Any] | None = None) -> sampling.Rollouts:
        """`sample` of the questions with `cfg` (default the run's settings)."""
        return sample(self.graphdef, self.params, self.template, questions, key, cfg or self.sampling_cfg,
                      rows_per_call=self.rows_per_call, mesh=self.mesh, engine=self.engine, progress=progress)
