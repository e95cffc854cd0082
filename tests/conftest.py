"""Test setup, whatever the working directory: the repository root on sys.path (so `hsd_jax`,
`models` and `tests.hf_reference` import), 8 simulated CPU devices (set before jax is imported),
offline Hugging Face, and hypothesis profiles.

Hypothesis: profile "ci" (chosen when the environment variable CI is set) draws the same
examples every run (`derandomize`, no example database); "dev" (otherwise) draws new ones each
run, and more of them. HYPOTHESIS_PROFILE=<name> picks one explicitly.
"""
import os
import pathlib
import sys

from hypothesis import settings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("ci", derandomize=True, database=None, max_examples=20, deadline=None,
                          print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
