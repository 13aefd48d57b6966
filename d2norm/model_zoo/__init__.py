"""d2norm's recipes, found by name like detectron2's ``model_zoo``.

    from d2norm import model_zoo
    path = model_zoo.get_config_file("synthetic/mask_rcnn_R_18_FPN_GN.yaml")
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml")

A name is a path relative to the recipe folder: ``configs/`` of a checkout, or the copy that an
installed package carries as ``d2norm/model_zoo/configs`` (setup.py copies ``configs/`` there at
build time). ``_BASE_`` references are relative to each file, so they resolve inside that folder.
YAML recipes give a yacs ``CfgNode`` with d2norm's ``D2NORM`` node; ``.py`` recipes (LazyConfig)
give detectron2's ``LazyConfig.load`` result.
"""

import os

__all__ = ["config_dir", "get_config_file", "get_config", "list_configs"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def config_dir():
    """The recipe folder in use: the package's copy if it has one, else the checkout's
    ``configs/`` (next to the ``d2norm`` package)."""
    packaged = os.path.join(_HERE, "configs")
    if os.path.isdir(packaged):
        return packaged
    checkout = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "configs")
    if os.path.isdir(checkout):
        return checkout
    raise FileNotFoundError(
        f"d2norm's recipes are missing: neither {packaged} (an installed package) nor {checkout} "
        "(a checkout) exists. Fix: reinstall d2norm from a wheel or `pip install .` of a checkout."
    )


def list_configs():
    """Every recipe name (``.yaml`` and ``.py``), sorted."""
    root = config_dir()
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            if f.endswith((".yaml", ".py")) and f != "__init__.py":
                names.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path):
    """The absolute path of recipe ``config_path`` (e.g.
    ``"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws.yaml"``); a leading ``configs/``
    is accepted. Raises ``RuntimeError`` naming close matches if there is no such recipe."""
    name = config_path.replace("\\", "/")
    if name.startswith("configs/"):
        name = name[len("configs/") :]
    path = os.path.join(config_dir(), name)
    if not os.path.isfile(path):
        stem = os.path.basename(name).rsplit(".", 1)[0].lower()
        close = [n for n in list_configs() if stem and stem in n.lower()][:5]
        hint = f" Close matches: {close}." if close else " See d2norm.model_zoo.list_configs()."
        where = config_dir()
        raise RuntimeError(f"{config_path!r} is not one of d2norm's recipes (looked in {where}).{hint}")
    return path


def get_config(config_path):
    """The recipe ``config_path`` loaded: a yacs ``CfgNode`` (detectron2's defaults, d2norm's
    ``D2NORM`` node, the YAML and its ``_BASE_`` chain merged) for ``.yaml``; detectron2's
    ``LazyConfig.load`` result for ``.py``. Pretrained-weight paths stay as the recipe writes them
    (``pretrained/...``; see docs/weights.md)."""
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        return LazyConfig.load(path)
    from detectron2.config import get_cfg

    from ..config import add_d2norm_config

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(path)
    return cfg
