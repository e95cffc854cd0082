"""hsd-jax trainer entry point: parses an ml_collections config and runs hsd_jax.trainer.

    python main.py                                   # configs/tiny.py: CPU, toy task, minutes
    python main.py --config configs/qwen3_32b.py --config.model.path=/models/Qwen3-32B ...
    python main.py --config configs/qwen3_8b.py:grpo --config.loss.beta=1e-4
    python main.py --coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$RANK ...

A config error prints one line naming the field and exits with status 2, before anything loads;
a run stopped by repeated non-finite updates exits with status 1; `--dry_run` exits with 3 when the
plan does not fit the device memory with 10 % headroom.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config (file[:variant]).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run started by hand "
    "(TPU pods, SLURM and Open MPI jobs are detected without it).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_DRY_RUN = flags.DEFINE_boolean(
    "dry_run", False, "Plan memory instead of training: per-device bytes of params, optimizer state, reference, "
    "KV cache and the compiled update and sampler on the configured mesh; nothing is allocated. On CPU, simulate N "
    "devices with XLA_FLAGS=--xla_force_host_platform_device_count=N.")
_DEVICE_MEMORY_GIB = flags.DEFINE_float("device_memory_gib", 80.0, "Device memory the dry run plans against.")
_LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "warning", ["debug", "info", "warning", "error"],
    "Library log level (absl, JAX, Orbax); 'info' brings back their INFO lines.",
)


def main(argv):
    del argv
    logging.set_verbosity(_LOG_LEVEL.value)
    from hsd_jax import sharding, trainer, validation

    sharding.initialize_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    try:
        if _DRY_RUN.value:
            from hsd_jax import memory_plan

            plan = memory_plan.report(validation.resolve(_CONFIG.value), device_memory_gib=_DEVICE_MEMORY_GIB.value)
            sys.exit(0 if plan["fits"] else 3)
        trainer.train(_CONFIG.value)
    except validation.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except trainer.NonFiniteUpdates as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
