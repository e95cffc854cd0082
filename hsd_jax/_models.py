"""The model package (Qwen3 and its Hugging Face I/O) wherever it lives, for the rest of hsd_jax.

In the repository the model is the top-level `models/` package (`from models import hf`). An
installed distribution ships the same files as `hsd_jax.models` (pyproject.toml maps models/
there), so that installing hsd-jax never adds, or shadows, a top-level `models` package of the
user's own. hsd_jax imports the model only through this module:

    from hsd_jax._models import hf, qwen3

which takes the top-level `models` only when it is the checkout's own models/ beside this
package (so a checkout, editable install or not, loads each model module once, under the name its
tests use) and `hsd_jax.models` otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def package_name() -> str:
    """"models" if the `models` that `import models` would load is the models/ directory beside
    this package (a checkout), else "hsd_jax.models" (an installed distribution)."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    try:
        spec = importlib.util.find_spec("models")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return "models" if any(os.path.realpath(p) == os.path.realpath(checkout) for p in locations) else "hsd_jax.models"


qwen3 = importlib.import_module(package_name() + ".qwen3")
hf = importlib.import_module(package_name() + ".hf")
