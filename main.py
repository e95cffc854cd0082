"""hsd-jax entry point: parses an ml_collections config and trains (hsd_jax.trainer) or, with
--mode, exports, evaluates or samples a trained checkpoint or HF model (hsd_jax.modes).

    python main.py                                   # configs/tiny.py: CPU, toy task, minutes
    python main.py --config configs/qwen3_32b.py --config.model.path=/models/Qwen3-32B ...
    python main.py --config configs/qwen3_8b.py:grpo --config.loss.beta=1e-4
    python main.py --coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$RANK ...
    python main.py --mode=export --export_dir=/models/mine [--step=N] [--export_dtype=bfloat16]
    python main.py --mode=eval --config.data.eval_files=aime.jsonl:avg@16,humaneval.jsonl:greedy
    echo "What is 2 + 3?" | python main.py --mode=sample [--prompts_file=prompts.jsonl]

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
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "export", "eval", "sample"],
    "train; export: the latest (or --step) checkpoint as a Hugging Face directory in --export_dir; eval: the "
    "checkpoint (or model.path when the workdir has none) on data.eval_files, a table and <workdir>/eval_<step>.json; "
    "sample: responses to --prompts_file or stdin lines.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where --mode=export writes the Hugging Face directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for export / eval / sample (default: the latest).")
_EXPORT_DTYPE = flags.DEFINE_enum("export_dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                                  "Weight dtype of --mode=export.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "--mode=sample: JSONL rows with a question (and an answer "
                                    "or tests, to be scored) or plain lines; default: standard input.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "--mode=sample: responses per prompt.")
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
        if _MODE.value == "train":
            trainer.train(_CONFIG.value)
            return
        from hsd_jax import modes

        if _MODE.value == "export":
            if not _EXPORT_DIR.value:
                raise validation.ConfigError("--mode=export needs --export_dir=DIR.")
            modes.run_export(_CONFIG.value, _EXPORT_DIR.value, _STEP.value, _EXPORT_DTYPE.value)
        elif _MODE.value == "eval":
            modes.run_eval(_CONFIG.value, _STEP.value)
        else:
            modes.run_sample(_CONFIG.value, modes.read_lines(_PROMPTS_FILE.value), _STEP.value, _NUM_SAMPLES.value)
    except validation.ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except trainer.NonFiniteUpdates as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
