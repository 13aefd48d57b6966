import os

import pytest
import torch

import d2norm  # noqa: F401  (stand-in for detectron2._C where needed, get_norm patch)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# The suite's models are tiny: one thread is as fast as two on an idle machine and avoids
# OpenMP spin-waiting slowdowns (10x seen) when the machine is shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """Synthetic splits generated once per test session."""
    root = str(tmp_path_factory.mktemp("d2norm_data"))
    from d2norm.data import register_synthetic_datasets

    register_synthetic_datasets(root, ["d2norm_shapes_tiny_train", "d2norm_shapes_tiny_val"])
    return root


def synthetic_cfg(norm="GN", **overrides):
    """The synthetic recipe for ``norm`` shrunk to the tiny split, as a detectron2 config."""
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, "synthetic", "Base-Synthetic.yaml"))
    for key in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD"):
        cfg.MODEL[key].NORM = norm
    cfg.DATASETS.TRAIN = ("d2norm_shapes_tiny_train",)
    cfg.DATASETS.TEST = ("d2norm_shapes_tiny_val",)
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 2
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg
