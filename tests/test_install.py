"""scripts/install.sh: checkouts share one dependency venv, and each imports its own d2norm."""

import os
import shutil
import subprocess

import pytest
from helpers import REPO

_NOT_COPIED = shutil.ignore_patterns(".venv", ".git", "output", "__pycache__", "*.egg-info", ".pytest_cache")


def _deps_venv():
    """The dependency venv this checkout's .venv was made for (written by scripts/install.sh)."""
    marker = os.path.join(REPO, ".venv", "d2norm-deps")
    if not os.path.isfile(marker):
        pytest.skip("this checkout's .venv was not made by scripts/install.sh (run it first)")
    with open(marker) as f:
        return f.read().strip()


def _import_from(checkout, cwd="/"):
    """The file ``import d2norm`` loads in ``checkout``'s .venv, run from ``cwd`` with a clean env
    (found by the import system without running the package, which would import torch)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import importlib.util; print(importlib.util.find_spec('d2norm').origin)"
    out = subprocess.run(
        [os.path.join(checkout, ".venv", "bin", "python"), "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return os.path.realpath(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_each_checkout_imports_its_own_d2norm(tmp_path):
    deps = _deps_venv()
    clones = [str(tmp_path / "a"), str(tmp_path / "b")]
    env = dict(os.environ, D2NORM_CACHE=os.path.dirname(deps))
    env.pop("PYTHONPATH", None)
    for clone in clones:
        shutil.copytree(REPO, clone, ignore=_NOT_COPIED)
        subprocess.run(
            ["bash", os.path.join(clone, "scripts", "install.sh")], env=env, check=True, capture_output=True
        )
        with open(os.path.join(clone, ".venv", "d2norm-deps")) as f:
            assert f.read().strip() == deps  # the same (reused) dependency venv, not a new build
    # after both installs, each clone (and this checkout) still imports its own package, whatever
    # the working directory (one outside every checkout)
    for checkout in clones + [REPO]:
        want = os.path.realpath(os.path.join(checkout, "d2norm", "__init__.py"))
        assert _import_from(checkout) == want
        assert _import_from(checkout, cwd=str(tmp_path)) == want
    # the shared dependency venv itself has no d2norm
    res = subprocess.run(
        [
            os.path.join(deps, "bin", "python"),
            "-c",
            "import importlib.util; print(importlib.util.find_spec('d2norm'))",
        ],
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.strip() == "None"
