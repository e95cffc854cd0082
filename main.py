"""hsd-jax trainer entry point: parses an ml_collections config and runs hsd_jax.trainer.

    python main.py                                   # configs/tiny.py: CPU, toy task, minutes
    python main.py --config configs/qwen3_32b.py --config.model.path=/models/Qwen3-32B ...
    python main.py --config configs/qwen3_8b.py:grpo --config.loss.beta=1e-4

A config error prints one line naming the field and exits with status 2, before anything loads;
a run stopped by repeated non-finite updates exits with status 1.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config (file[:variant]).")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Library log level (absl, JAX, Orbax); 'info' brings back their INFO lines.",
)


def main(argv):
    del argv
    logging.set_verbosity(_LOG_LEVEL.value)
    from hsd_jax import trainer, validation

    try:
        trainer.train(_CONFIG.value)
    except validation.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except trainer.NonFiniteUpdates as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
