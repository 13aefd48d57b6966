"""tools/convert_weights.py / d2norm.convert: files in the real key layouts of torchvision, timm,
Detectron (.pkl), the official CBN (mmdetection) and MABN (maskrcnn-benchmark) checkpoints,
generated here with random values (no downloads), converted for a recipe and loaded back.

Layouts: torchvision / timm ``resnet*`` (``conv1``, ``bn1``, ``layer{i}.{b}.conv{k}`` / ``bn{k}``,
``downsample.0/1``, ``fc``); mmdetection ``{"state_dict": {"backbone." + those, "neck.lateral_convs.0
.conv.weight", "rpn_head.rpn_conv.weight", "bbox_head.fc_cls.weight", ...}, "meta": ...}``;
maskrcnn-benchmark ``{"model": {"module.backbone.body.stem.conv1.weight", "...stem.bn1.*",
"...body.layer1.0.conv1.weight", "module.backbone.fpn.fpn_inner1.weight", "module.rpn.head.conv
.weight", "module.roi_heads.box.predictor.cls_score.weight", ...}, "optimizer": ..., "iteration"}``.
"""

import importlib.util
import os
import pickle

import pytest
import torch
import torchvision
from helpers import REPO, c2_name, synthetic_cfg, torchvision_module_pairs
from torch import nn

import d2norm
from d2norm.checkpoint import CheckpointError, D2NormCheckpointer
from d2norm.convert import INPUT_CONVENTIONS, convert_weights

_RGB = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
}
_MRCNN = {
    "INPUT.FORMAT": "BGR",
    "MODEL.PIXEL_MEAN": [102.9801, 115.9465, 122.7717],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.RESNETS.STRIDE_IN_1X1": True,
}


def _cfg(norm, fmt):
    return synthetic_cfg(norm, **{"MODEL.RESNETS.STRIDE_IN_1X1": False, **fmt})


def _mrcnn_cfg(norm):
    return synthetic_cfg(norm, **_MRCNN)


def _tv(norm):
    """A torchvision / timm ResNet-18 with random values (GN in the bn slots for timm's *_gn)."""
    torch.manual_seed(2)
    layer = (lambda c: nn.GroupNorm(32, c)) if norm == "GN" else None
    net = torchvision.models.resnet18(norm_layer=layer)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return net


def _convert_and_reload(tmp_path, cfg, data, name="in.pth", source="auto", parts=None):
    path = str(tmp_path / name)
    if name.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    state, info = convert_weights(cfg, path, source=source, parts=parts)
    out = str(tmp_path / "out.pth")
    torch.save({"model": state}, out)
    model = d2norm.build_model(cfg)
    D2NormCheckpointer(model).load(out)  # exact names: the layout the recipe loads
    return model, info


def _assert_same_as_torchvision(net, model):
    for tv_m, d2_m in torchvision_module_pairs(net, model.backbone.bottom_up):
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(tv_m, leaf, None)
            if src is None or (leaf == "running_mean" and not hasattr(d2_m, leaf)):  # MABN: no mean
                continue
            dst = (
                d2_m.parametrizations.weight.original
                if leaf == "weight" and hasattr(d2_m, "parametrizations")
                else getattr(d2_m, leaf)
            )
            assert torch.equal(dst.detach(), src.detach()), (d2_m, leaf)


@pytest.mark.parametrize(
    "source, norm", [("torchvision", "BN"), ("timm", "GN"), ("timm", "GN+WS"), ("mabn", "MABN")]
)
def test_torchvision_timm_and_mabn_backbones(tmp_path, source, norm):
    net = _tv("GN" if "GN" in norm else "BN")
    sd = net.state_dict()
    data = {"state_dict": sd} if source == "timm" else sd
    cfg = _mrcnn_cfg(norm) if source == "mabn" else _cfg(norm, _RGB)
    model, info = _convert_and_reload(tmp_path, cfg, data, source="mabn" if source == "mabn" else "auto")
    _assert_same_as_torchvision(net, model)
    assert info["source"] == source
    assert info["input"] == INPUT_CONVENTIONS[source]


def test_official_cbn_mmdetection_checkpoint(tmp_path):
    net = _tv("BN")
    sd = {"backbone." + k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(0)
    heads = {
        "neck.lateral_convs.0.conv.weight": (256, 64, 1, 1),
        "neck.fpn_convs.0.conv.weight": (256, 256, 3, 3),
        "rpn_head.rpn_conv.weight": (256, 256, 3, 3),
        "bbox_head.shared_fcs.0.weight": (1024, 12544),
        "bbox_head.fc_cls.weight": (81, 1024),
    }
    sd.update({k: torch.randn(s, generator=g) for k, s in heads.items()})
    data = {"state_dict": sd, "meta": {"epoch": 12, "mmdet_version": "1.0rc0"}}
    model, info = _convert_and_reload(tmp_path, _cfg("BN", _RGB), data, parts=["backbone"])
    assert info["source"] == "mmdet"
    _assert_same_as_torchvision(net, model)
    assert info["not_converted"] == sorted(heads)


def test_official_mabn_maskrcnn_benchmark_checkpoint(tmp_path):
    net = _tv("BN")
    body = {}
    for k, v in net.state_dict().items():
        if k.startswith("fc."):
            continue
        k = "stem." + k if k.startswith(("conv1.", "bn1.")) else k
        body["module.backbone.body." + k] = v
    heads = {"module.backbone.fpn.fpn_inner1.weight": torch.zeros(256, 64, 1, 1)}
    heads["module.rpn.head.conv.weight"] = torch.zeros(256, 256, 3, 3)
    heads["module.roi_heads.box.predictor.cls_score.weight"] = torch.zeros(81, 1024)
    data = {"model": {**body, **heads}, "optimizer": {"state": {}, "param_groups": []}, "iteration": 90000}
    cfg = _mrcnn_cfg("BN")
    model, info = _convert_and_reload(tmp_path, cfg, data, parts=["backbone"])
    assert info["source"] == "maskrcnn_benchmark"
    _assert_same_as_torchvision(net, model)
    assert info["not_converted"] == sorted(k[len("module.") :] for k in heads)


def test_detectron_pkl(tmp_path):
    cfg = synthetic_cfg("GN", **{"INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675]})
    ref = d2norm.build_model(cfg)
    g = torch.Generator().manual_seed(1)
    prefix = "backbone.bottom_up."
    blobs, want = {}, {}
    for k, v in ref.state_dict().items():
        if k.startswith(prefix):
            want[k] = torch.randn(v.shape, generator=g)
            blobs[c2_name(k[len(prefix) :])] = want[k].numpy()
    model, info = _convert_and_reload(tmp_path, cfg, blobs, name="R-18-GN.pkl")
    assert info["source"] == "detectron2"
    got = model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_refusals_name_what_was_found(tmp_path):
    cfg = _cfg("BN", _RGB)
    r50 = torchvision.models.resnet50().state_dict()  # R-50 file, R-18 recipe: shapes do not fit
    torch.save(r50, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match="wrong shape|have no place|not these"):
        convert_weights(cfg, str(tmp_path / "r50.pth"))
    v2 = {
        "stem.conv.weight": torch.zeros(64, 3, 7, 7),
        "stages.0.blocks.0.conv1.weight": torch.zeros(64, 64, 1, 1),
    }
    torch.save(v2, tmp_path / "bit.pth")
    with pytest.raises(CheckpointError, match="pre-activation"):
        convert_weights(cfg, str(tmp_path / "bit.pth"))
    torch.save({"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "vit.pth")
    with pytest.raises(
        CheckpointError, match="Unrecognized weights layout.*encoder.blocks.0.attn.qkv.weight"
    ):
        convert_weights(cfg, str(tmp_path / "vit.pth"))
    torch.save(_tv("BN").state_dict(), tmp_path / "tv.pth")
    bgr = _cfg("BN", {"INPUT.FORMAT": "BGR"})  # torchvision weights expect RGB
    with pytest.raises(ValueError, match=r"INPUT\.FORMAT is BGR, the weights expect RGB"):
        convert_weights(bgr, str(tmp_path / "tv.pth"))


def test_tool_command_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_tool", os.path.join(REPO, "tools", "convert_weights.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.save(_tv("GN").state_dict(), tmp_path / "resnet18_gn.pth")
    fmt = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]"]
    fmt += ["MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]
    info = tool.main(
        [
            "--config-file",
            "synthetic/mask_rcnn_R_18_FPN_GN.yaml",
            str(tmp_path / "resnet18_gn.pth"),
            str(tmp_path / "o.pth"),
            *fmt,
        ]
    )
    assert info["source"] == "timm" and info["loaded"] > 0
    assert "tensors written to" in capsys.readouterr().out
