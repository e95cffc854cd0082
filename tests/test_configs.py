"""Every config file and loss variant builds a valid config; bad settings fail before compiling."""
import importlib

import pytest

from hsd_jax import losses, trainer


@pytest.mark.parametrize("module", ["tiny", "qwen3_8b", "qwen3_32b"])
@pytest.mark.parametrize("variant", [None, *losses.PRESETS])
def test_configs_and_variants_validate(module, variant):
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    loss_cfg = trainer.loss_config(config)
    assert config.loss.name == (variant or "hsd")
    assert loss_cfg.max_response_length == config.sampling.max_new_tokens
    if module == "tiny":
        trainer.validate(config, loss_cfg)


def test_teacher_losses_need_a_context():
    config = importlib.import_module("configs.tiny").get_config("hsd")
    config.hindsight.context = "none"
    with pytest.raises(ValueError, match="hindsight.context"):
        trainer.validate(config, trainer.loss_config(config))


def test_micro_batch_must_divide_the_step():
    config = importlib.import_module("configs.tiny").get_config()
    config.train.micro_batch = 7
    with pytest.raises(ValueError, match="micro_batch"):
        trainer.validate(config, trainer.loss_config(config))


def test_sweep_override_reaches_the_loss():
    config = importlib.import_module("configs.qwen3_8b").get_config("grpo")
    config.loss.beta = 1e-4
    assert trainer.loss_config(config).beta == 1e-4


def test_teacher_length_must_fit_question_and_rollout():
    config = importlib.import_module("configs.tiny").get_config()
    config.hindsight.max_teacher_len = config.data.max_prompt_len + config.sampling.max_new_tokens
    with pytest.raises(ValueError, match="max_teacher_len"):
        trainer.validate(config, trainer.loss_config(config))


@pytest.mark.parametrize("field,value", [("peer_rule", "random"), ("context", "everything")])
def test_unknown_hindsight_choices_are_errors(field, value):
    config = importlib.import_module("configs.tiny").get_config()
    config.hindsight[field] = value
    with pytest.raises(ValueError, match=f"hindsight.{field}"):
        trainer.validate(config, trainer.loss_config(config))
