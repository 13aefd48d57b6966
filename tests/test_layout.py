"""The boundary between the library and its scripts: tools/, benchmarks/ and train_net.py use
d2norm's public names only and need no sys.path edits; the benchmark modules import."""

import ast
import glob
import importlib
import os

import pytest
from helpers import REPO

SCRIPTS = sorted(
    glob.glob(os.path.join(REPO, "tools", "*.py"))
    + glob.glob(os.path.join(REPO, "benchmarks", "*.py"))
    + [os.path.join(REPO, "train_net.py")]
)


def _private_d2norm_names(path):
    """``module:line name`` for every private d2norm module or name a script imports or reads."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "d2norm":
            parts = node.module.split(".") + [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            parts = [p for a in node.names if a.name.split(".")[0] == "d2norm" for p in a.name.split(".")]
        elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "d2norm":
            parts = [node.attr]
        else:
            continue
        found += [f"{os.path.relpath(path, REPO)}:{node.lineno} {p}" for p in parts if p.startswith("_")]
    return found


def test_scripts_use_public_d2norm_names_only():
    assert len(SCRIPTS) > 5
    private = [hit for path in SCRIPTS for hit in _private_d2norm_names(path)]
    assert private == []


def test_scripts_do_not_edit_sys_path():
    edits = [os.path.relpath(p, REPO) for p in SCRIPTS if "sys.path" in open(p, encoding="utf-8").read()]
    assert edits == []


@pytest.mark.parametrize(
    "name", ["common", "layers", "detector", "model", "cbn_speed", "mabn_speed", "kernels"]
)
def test_benchmark_modules_import(name):
    mod = importlib.import_module(f"benchmarks.{name}")
    assert os.path.dirname(os.path.abspath(mod.__file__)) == os.path.join(REPO, "benchmarks")
