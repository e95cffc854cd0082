"""main.py's modes on a tiny run trained for two steps (`python main.py`, which exports at the end):
export loads in transformers with the JAX model's logits, eval writes its table and JSON, sample
prints responses with the rewards of rows that carry answers."""
import importlib
import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

from hsd_jax import data, modes, rewards, validation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(data__toy_examples=64, data__questions_per_step=2, sampling__group_size=4, sampling__max_new_tokens=12,
            train__micro_batch=4, train__sft_warmup_steps=2, train__steps=2, train__checkpoint_every=1,
            train__eval_every=0)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",  # one CPU device: the cheapest run of the same program
       "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()}


def tiny_config(workdir, **overrides):
    config = importlib.import_module("configs.tiny").get_config()
    for name, value in {**TINY, "workdir": str(workdir), **overrides}.items():
        *parents, field = name.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value
    return config


def main_py(*args):
    return subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run of two RL steps (checkpoints 1 and 2), exported at the end into <workdir>/hf."""
    workdir = tmp_path_factory.mktemp("run")
    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in TINY.items()]
    result = main_py(*flags, f"--config.workdir={workdir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"exported to {workdir / 'hf'}" in result.stdout
    return workdir


def jax_logits(model, tokens):
    hidden, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    return np.asarray(model.logits(hidden))


def torch_logits(path, tokens):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def tensors(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def test_export_loads_in_transformers_with_the_checkpoints_logits(workdir, tmp_path):
    config = tiny_config(workdir)
    path = modes.run_export(config, str(tmp_path / "hf32"), dtype="float32")

    model = modes.load(config)
    assert model.step == 2  # the latest checkpoint
    tokens = np.random.default_rng(0).integers(0, len(model.tokenizer), (2, 11))
    np.testing.assert_allclose(torch_logits(path, tokens), jax_logits(nnx.merge(model.graphdef, model.params), tokens),
                               atol=2e-5, rtol=1e-5)
    # The export at the end of training (from the trainer's state, in bfloat16) holds the same weights, rounded.
    exported, at_end = tensors(path), tensors(workdir / "hf")
    assert set(exported) == set(at_end) and all(t.dtype == np.float32 for t in exported.values())
    for name, tensor in exported.items():
        assert at_end[name].dtype.name == "bfloat16"
        np.testing.assert_array_equal(at_end[name], tensor.astype(at_end[name].dtype), err_msg=name)
    with open(workdir / "hf" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with open(workdir / "hf" / "generation_config.json") as f:
        generation = json.load(f)
    run_tokenizer = model.tokenizer
    assert generation["temperature"] == config.sampling.temperature and generation["top_p"] == config.sampling.top_p
    assert run_tokenizer.eos_token_id in generation["eos_token_id"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
    text = "What is 12 + 7? Answer: 19"
    assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"]


def test_named_step_and_missing_step(workdir):
    config = tiny_config(workdir)
    first, latest = modes.load(config, step=1), modes.load(config)
    assert first.step == 1
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(latest.params)))
    with pytest.raises(validation.ConfigError, match=r"--step=7: no checkpoint 7 .*saved: \[1, 2\]"):
        modes.load(config, step=7)


def test_eval_mode_from_the_command_line_writes_its_table_and_json(workdir, tmp_path):
    rows = [data.toy_problem(random.Random(i)) for i in range(3)]
    for name in ("greedy_set", "sampled"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    spec = f"{tmp_path / 'greedy_set.jsonl'}:greedy,{tmp_path / 'sampled.jsonl'}:avg@2"
    flags = [f"--config.{k.replace('__', '.')}={v}" for k, v in TINY.items()]
    result = main_py("--mode=eval", *flags, f"--config.workdir={workdir}", f"--config.data.eval_files={spec}",
                     "--config.train.eval_ks=(1,2)")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    with open(workdir / "eval_2.json") as f:
        report = json.load(f)
    assert report["step"] == 2 and report["ks"] == [1, 2]
    assert [(s["name"], s["n"], s["temperature"], s["questions"]) for s in report["sets"]] == [
        ("greedy_set", 1, 0.0, 3), ("sampled", 2, 1.0, 3)]
    m = report["metrics"]
    assert "eval/greedy_set/pass@2" not in m and "eval/pass@2" not in m and "eval/sampled/pass@2" in m
    assert m["eval/accuracy"] == pytest.approx((m["eval/greedy_set/avg@1"] + m["eval/sampled/avg@2"]) / 2)
    assert 1 <= m["eval/response_length"] <= TINY["sampling__max_new_tokens"]
    table = result.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("set "))
    assert [line.split()[0] for line in table[header + 2 : header + 5]] == ["greedy_set", "sampled", "overall"]


def test_sample_mode_prints_responses_and_rewards_of_rows_with_answers(workdir, capsys):
    problem = data.toy_problem(random.Random(5))
    lines = [json.dumps({"question": problem["question"], "answer": problem["answer"]}), "", "What is 2 + 3?"]
    responses = modes.run_sample(tiny_config(workdir), lines, num_samples=2)
    out = capsys.readouterr().out
    assert [len(r) for r in responses] == [2, 2]
    expected, _ = rewards.score([{"question": problem["question"], "answer": problem["answer"]}] * 2, responses[0], "math")
    blocks = out.split("=== prompt ")[1:]
    assert blocks[0].startswith(f"1: {problem['question']}") and blocks[1].startswith("2: What is 2 + 3?")
    for j, reward in enumerate(expected):
        assert f"--- response {j + 1} (" in blocks[0] and responses[0][j] in blocks[0]
    first_rewards = [float(part.split(", reward ")[1].split(")")[0]) for part in blocks[0].split("--- response ")[1:]]
    truncated = [", truncated" in part.split("\n")[0] for part in blocks[0].split("--- response ")[1:]]
    assert first_rewards == [0.0 if t else float(r) for r, t in zip(expected, truncated)]
    assert "reward" not in blocks[1]  # a plain question has nothing to check against


def test_eval_of_the_exported_directory_as_model_path_matches_the_checkpoint(workdir, tmp_path):
    rows = [data.toy_problem(random.Random(i)) for i in range(4)]
    with open(tmp_path / "probe.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    spec = f"{tmp_path / 'probe.jsonl'}:greedy"
    exported = modes.run_export(tiny_config(workdir), str(tmp_path / "hf32"), dtype="float32")
    from_checkpoint = modes.run_eval(tiny_config(workdir, data__eval_files=spec))
    fresh = tmp_path / "fresh"  # no checkpoints: the model is model.path, its tokenizer the exported one
    from_hf = modes.run_eval(tiny_config(fresh, data__eval_files=spec, model__path=exported))
    assert from_hf.metrics == from_checkpoint.metrics  # greedy decoding of the same weights
    with open(fresh / "eval_hf.json") as f:
        assert json.load(f)["model"] == exported
