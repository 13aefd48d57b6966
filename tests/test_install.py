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


# Run inside the venv that has only the installed wheel (+ the dependencies), from a folder outside
# the checkout: the package, its recipes and its metadata as a pip user gets them.
_WHEEL_USER = r"""
import json, os, sys
from importlib import metadata
import d2norm
from d2norm import model_zoo
out = {"d2norm": d2norm.__file__, "config_dir": model_zoo.config_dir()}
out["n_recipes"] = len(model_zoo.list_configs())
built = {}
for name in sys.argv[1:]:
    cfg = model_zoo.get_config(name)
    cfg.MODEL.DEVICE = "cpu"
    model = d2norm.build_model(cfg)
    norms = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()
                    or type(m).__name__.endswith(("BN", "BatchNorm2d"))})
    built[name] = {"params": sum(p.numel() for p in model.parameters()), "norms": norms}
out["built"] = built
# a LazyConfig recipe: its relative imports (configs/lazy/common/) resolve inside the package
from d2norm.engine.lazy_trainer import check_trainable, trainer_config
lazy = model_zoo.get_config("lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn.py")
check_trainable(lazy)
view = trainer_config(lazy)
out["lazy"] = {"train": list(view.DATASETS.TRAIN), "max_iter": view.SOLVER.MAX_ITER}
out["lazy"]["weights"] = view.MODEL.WEIGHTS
meta = metadata.metadata("d2norm")
out["summary"] = meta["Summary"]
out["license"] = meta.get("License") or meta.get("License-Expression")
out["home"] = meta.get("Home-page") or " ".join(meta.get_all("Project-URL") or [])
out["description_type"] = meta.get("Description-Content-Type")
out["description"] = meta.get_payload() or meta.get("Description") or ""
scripts = metadata.entry_points(group="console_scripts")
out["scripts"] = sorted(e.name for e in scripts if e.value.startswith("d2norm"))
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_wheel_ships_recipes_and_builds_them_outside_the_checkout(tmp_path):
    """``pip wheel .`` of the checkout, installed with ``--no-deps`` into an empty venv that sees
    only the dependency venv's site-packages (not the checkout): the wheel carries every recipe,
    ``d2norm.model_zoo`` resolves ``_BASE_`` inside the package, and three recipes build there."""
    deps = _deps_venv()
    deps_py = os.path.join(deps, "bin", "python")
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    subprocess.run(
        [deps_py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), src],
        env=env,
        check=True,
        capture_output=True,
    )
    (wheel,) = [str(p) for p in wheels.iterdir() if p.name.endswith(".whl")]
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.startswith("d2norm/model_zoo/configs/")}
    in_checkout = {
        os.path.relpath(os.path.join(d, f), REPO).replace(os.sep, "/")
        for d, _, fs in os.walk(os.path.join(REPO, "configs"))
        for f in fs
        if f.endswith((".yaml", ".py")) and "__pycache__" not in d
    }
    assert {"d2norm/model_zoo/" + n for n in in_checkout} == shipped

    venv = tmp_path / "venv"
    subprocess.run([deps_py, "-m", "venv", "--without-pip", str(venv)], check=True, env=env)
    py = str(venv / "bin" / "python")
    site_code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_dir = subprocess.run([py, "-c", site_code], capture_output=True, text=True, check=True).stdout
    site_dir = site_dir.strip()
    deps_site = subprocess.run([deps_py, "-c", site_code], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(site_dir, "deps.pth"), "w") as f:  # the dependencies only, no checkout
        f.write(f"import site; site.addsitedir({deps_site.strip()!r})\n")
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        env=env,
        check=True,
        capture_output=True,
    )
    recipes = [
        "synthetic/mask_rcnn_R_18_FPN_GN_WS.yaml",
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml",
        "COCO-Detection/faster_rcnn_R_50_FPN_2x_mabn.yaml",
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(
        [py, "-c", _WHEEL_USER, *recipes], cwd=str(elsewhere), env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["d2norm"].startswith(site_dir), out["d2norm"]  # the installed copy, not the checkout
    assert out["config_dir"].startswith(site_dir)
    assert out["n_recipes"] == len(in_checkout)
    # the _BASE_ chains resolved inside the package: each recipe's own norms were built
    assert "GroupNorm" in " ".join(out["built"][recipes[0]]["norms"])
    assert any("CrossIteration" in n or "CBN" in n for n in out["built"][recipes[1]]["norms"])
    assert any("MovingAverage" in n or "MABN" in n for n in out["built"][recipes[2]]["norms"])
    from d2norm import model_zoo

    gn_yaml = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn.yaml")
    assert out["lazy"] == {
        "train": list(gn_yaml.DATASETS.TRAIN),
        "max_iter": gn_yaml.SOLVER.MAX_ITER,
        "weights": gn_yaml.MODEL.WEIGHTS,
    }
    # metadata: every method named, README as the description, licence, URL, the command
    methods = (
        "BN*",
        "FrozenStatsBN",
        "SyncBN",
        "GN",
        "GN+WS",
        "BN+WS",
        "BCN",
        "BCN+WS",
        "CBN",
        "MABN",
        "BRN",
        "FRN",
        "EvoNorm",
    )
    for method in methods:
        assert method in out["summary"], method
    assert out["license"] == "Apache-2.0"
    assert out["home"].startswith("https://")
    assert out["description_type"] == "text/markdown"
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        assert f.read().splitlines()[0] in out["description"]
    assert out["scripts"] == ["d2norm-train"]
