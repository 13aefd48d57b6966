"""Helpers shared by the test modules (``from helpers import ...``; fixtures live in conftest.py)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def synthetic_cfg(norm="GN", **overrides):
    """The synthetic recipe for ``norm`` shrunk to the tiny split, as a detectron2 config."""
    from d2norm import add_d2norm_config

    from detectron2.config import get_cfg

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


def tiny_train_argv(config, out, data_root, *opts, test="()"):
    """``tools/train_net.py`` arguments: the synthetic recipe ``configs/synthetic/<config>``
    trained on the tiny split, ``DATASETS.TEST`` ``test`` (none by default), output in ``out``,
    then the overrides ``opts``."""
    return [
        "--config-file",
        os.path.join(CONFIGS, "synthetic", config),
        "OUTPUT_DIR",
        str(out),
        "D2NORM.DATA.ROOT",
        data_root,
        "DATASETS.TRAIN",
        "('d2norm_shapes_tiny_train',)",
        "DATASETS.TEST",
        test,
        *opts,
    ]


def sgd_losses(model, batches, lr, momentum=0.0):
    """One SGD step (the trainable parameters, ``lr``, ``momentum``) of ``model`` in train mode per
    batch of ``batches`` (detectron2 input lists), in an ``EventStorage``; the float losses."""
    import torch

    from detectron2.utils.events import EventStorage

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    out = []
    model.train()
    with EventStorage(0):
        for batch in batches:
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(float(loss))
    return out


def retinanet_cfg(head_norm, backbone_norm="GN"):
    """The synthetic config turned into a small RetinaNet (P3-P7, 2-conv heads) with ``head_norm``
    in its heads."""
    cfg = synthetic_cfg(backbone_norm)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s] for s in (16, 32, 64, 128, 256)]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    cfg.MODEL.RETINANET.NUM_CONVS = 2
    cfg.MODEL.RETINANET.NORM = head_norm
    return cfg


def convs_with_norm(module):
    """The detectron2 ``Conv2d`` modules of ``module`` that carry a norm (a model's count of
    normalized convs, read from the model rather than written down)."""
    from detectron2.layers import Conv2d

    return [m for m in module.modules() if isinstance(m, Conv2d) and getattr(m, "norm", None) is not None]


def _run_python(args, timeout):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_tool(name, *argv, timeout=900):
    """``python tools/<name> argv...`` in a subprocess with 1 torch thread; the CompletedProcess."""
    return _run_python([os.path.join(REPO, "tools", name), *argv], timeout)


def run_code(code, timeout=300):
    """``python -c code`` in a fresh interpreter with 1 torch thread; the CompletedProcess."""
    return _run_python(["-c", code], timeout)


def c2_name(d2_name):
    """detectron2 ResNet name -> Caffe2/Detectron blob name (GN models: _gn_s/_gn_b)."""
    parts = d2_name.split(".")
    leaf = {"weight": "w", "bias": "b"}[parts[-1]]
    if parts[0] == "stem":  # stem.conv1.weight / stem.conv1.norm.{weight,bias}
        return "conv1_gn_" + {"w": "s", "b": "b"}[leaf] if parts[2] == "norm" else "conv1_w"
    stage, block, conv = parts[0], parts[1], parts[2]
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
    if parts[3] == "norm":
        return f"{stage}_{block}_{branch}_gn_" + {"w": "s", "b": "b"}[leaf]
    return f"{stage}_{block}_{branch}_w"


def torchvision_module_pairs(tv, bottom_up):
    """(torchvision module, detectron2 module) pairs, by walking both networks."""
    pairs = [(tv.conv1, bottom_up.stem.conv1), (tv.bn1, bottom_up.stem.conv1.norm)]
    for i in range(1, 5):
        for tv_block, d2_block in zip(getattr(tv, f"layer{i}"), getattr(bottom_up, f"res{i + 1}")):
            pairs += [
                (tv_block.conv1, d2_block.conv1),
                (tv_block.bn1, d2_block.conv1.norm),
                (tv_block.conv2, d2_block.conv2),
                (tv_block.bn2, d2_block.conv2.norm),
            ]
            if tv_block.downsample is not None:
                pairs += [
                    (tv_block.downsample[0], d2_block.shortcut),
                    (tv_block.downsample[1], d2_block.shortcut.norm),
                ]
            else:
                assert not hasattr(d2_block, "shortcut") or d2_block.shortcut is None
    return pairs
