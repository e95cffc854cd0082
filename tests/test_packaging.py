"""pyproject.toml: the distribution installs the library and the model as `hsd_jax.models`, used
from outside the checkout next to a user's own `models` package (never shadowed), with
requirements.txt's dependencies; an editable install does the same; the README's library example
runs against the installed copy.

Installs build with the running interpreter's setuptools (`--no-build-isolation`: no network).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "hsd_jax", "models")
# Run from a user's project: its own top-level `models` package, the checkout not on sys.path.
IMPORTS = """
import models
assert models.OWNER == "user", models.__file__
from hsd_jax import losses, sampling
from hsd_jax.models import hf, qwen3
assert sampling.qwen3 is qwen3 and hf.Qwen3 is qwen3.Qwen3
print(qwen3.__file__)
"""


def copy_sources(destination) -> str:
    """The files a build reads, copied out of the checkout (a build writes build/ and *.egg-info)."""
    os.makedirs(destination)
    for name in SOURCES:
        source, copy = os.path.join(REPO_ROOT, name), os.path.join(destination, name)
        if os.path.isdir(source):
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy)
    return str(destination)


def pip_install(python: str, *args) -> None:
    result = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def run_python(python: str, code: str, cwd, pythonpath: str = "") -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of a copy of the checkout: the directory holding the installed files."""
    tmp = tmp_path_factory.mktemp("install")
    pip_install(sys.executable, "--target", str(tmp / "site"), copy_sources(tmp / "src"))
    return tmp / "site"


@pytest.fixture
def user_project(tmp_path):
    """A directory holding a `models` package of the user's own."""
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text('OWNER = "user"\n')
    return project


def requirements() -> list[str]:
    """requirements.txt's requirement lines, comments dropped."""
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def test_installed_copy_imports_from_outside_the_checkout(installed, user_project):
    target = installed
    assert sorted(p for p in os.listdir(target) if not p.endswith(".dist-info")) == ["hsd_jax"]  # no top-level models
    out = run_python(sys.executable, IMPORTS, cwd=user_project, pythonpath=str(target))
    assert out.strip() == str(target / "hsd_jax" / "models" / "qwen3.py")
    (dist_info,) = [p for p in os.listdir(target) if p.endswith(".dist-info")]
    with open(target / dist_info / "METADATA") as f:
        declared = [line.removeprefix("Requires-Dist: ").strip() for line in f if line.startswith("Requires-Dist:")]
    assert declared == requirements()


def test_editable_install_imports_from_anywhere_and_loads_the_model_once_in_the_checkout(tmp_path, user_project):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    with open(os.path.join(site, "parent_environment.pth"), "w") as f:  # this interpreter's packages (jax, pip, ...)
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    source = copy_sources(tmp_path / "src")
    pip_install(python, "-e", source)

    out = run_python(python, IMPORTS, cwd=user_project)
    assert out.strip() == os.path.join(source, "models", "qwen3.py")
    in_checkout = "import models.qwen3\nfrom hsd_jax import sampling\nassert sampling.qwen3 is models.qwen3\n"
    run_python(python, in_checkout, cwd=source)


def test_readme_library_example_runs_against_an_installed_copy(installed, user_project):
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Using the pieces", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "from hsd_jax.models import qwen3" in example
    out = run_python(sys.executable, example, cwd=user_project, pythonpath=str(installed))
    loss, divergence = map(float, re.fullmatch(r"loss=(\S+) divergence=(\S+)\n", out).groups())
    assert loss == pytest.approx(divergence) and divergence > 0  # the distillation term is the mean divergence
