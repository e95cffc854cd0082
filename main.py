"""hsd-jax trainer entry point: parses an ml_collections config and runs hsd_jax.trainer.

    python main.py                                   # configs/tiny.py: CPU, toy task, minutes
    python main.py --config configs/qwen3_32b.py --config.model.path=/models/Qwen3-32B ...
    python main.py --config configs/qwen3_8b.py:grpo --config.loss.beta=1e-4
"""

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config (file[:variant]).")


def main(argv):
    del argv
    from hsd_jax import trainer

    trainer.train(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
