"""Folding eval-mode norms into convs: each step against the unfolded torch modules in float64,
whole Mask R-CNN models (every foldable norm) against their unfolded selves, and tools/deploy.py
(fold + check + TorchScript trace + atomic save)."""

import copy
import importlib.util
import os

import pytest
import torch
from helpers import REPO, convs_with_norm, synthetic_cfg
from torch import nn
from torch.nn.utils import parametrize

import d2norm  # noqa: F401  (before detectron2: the _C stand-in)
from d2norm.deploy import eval_affine, fold, fold_affine_into_conv, is_foldable, load_folded_model
from d2norm.detections import compare_detections
from d2norm.layers import (
    BatchNormWS,
    CrossIterationBatchNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)

from detectron2.layers import Conv2d, FrozenBatchNorm2d

F64 = torch.float64


def _make_norm(kind, c):
    return {
        "BN": lambda: nn.BatchNorm2d(c),
        "SyncBN": lambda: SyncBatchNorm2d(c),
        "BN+WS": lambda: BatchNormWS(c),
        "BN*": lambda: FrozenBatchNorm2d(c),
        "CBN": lambda: CrossIterationBatchNorm2d(c, buffer_size=3),
        "MABN": lambda: MovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=0),
        "GN": lambda: GroupNorm(2, c),
        "GN+WS": lambda: GroupNormWS(2, c),
    }[kind]()


def _randomize(module, gen):
    """Non-trivial affine parameters and running statistics for every norm in ``module``."""
    with torch.no_grad():
        for m in module.modules():
            for name in ("weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and not isinstance(m, nn.Conv2d) and t.dim() == 1:
                    t.copy_(
                        torch.rand(t.shape, generator=gen, dtype=F64) * 1.5 + 0.25
                        if name == "weight"
                        else torch.randn(t.shape, generator=gen, dtype=F64)
                    )
            if getattr(m, "running_var", None) is not None:
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen, dtype=F64) * 2 + 0.3)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen, dtype=F64))


class _Net(nn.Module):
    """Two detectron2 Conv2d + norm blocks (strided, grouped), prepared like a d2norm model."""

    def __init__(self, kind):
        super().__init__()
        self.a = Conv2d(
            3, 8, 3, stride=2, padding=1, bias=False, norm=_make_norm(kind, 8), activation=torch.relu
        )
        self.b = Conv2d(8, 6, 3, padding=2, dilation=2, groups=2, bias=False, norm=_make_norm(kind, 6))
        d2norm.prepare_model(self)

    def forward(self, x):
        return self.b(self.a(x))


FOLDABLE = ["BN", "SyncBN", "BN+WS", "BN*", "CBN", "MABN"]


@pytest.mark.parametrize("kind", FOLDABLE)
def test_eval_affine_is_the_eval_norm(kind):
    gen = torch.Generator().manual_seed(0)
    norm = _make_norm(kind, 5).to(F64)
    _randomize(norm, gen)
    norm.eval()
    assert is_foldable(norm)
    y = torch.randn(3, 5, 4, 4, generator=gen, dtype=F64) * 3 + 1
    scale, shift = eval_affine(norm)
    assert scale.dtype == shift.dtype == F64
    torch.testing.assert_close(
        y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), norm(y), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("kind", ["GN", "GN+WS"])
def test_group_norm_is_not_foldable(kind):
    norm = _make_norm(kind, 4)
    assert not is_foldable(norm)
    with pytest.raises(TypeError, match="per-sample statistics"):
        eval_affine(norm)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        eval_affine(nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("bias,groups", [(False, 1), (True, 1), (True, 2)])
def test_fold_affine_into_conv_float64(bias, groups):
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups, bias=bias).to(F64)
    ref = copy.deepcopy(conv)
    scale = torch.rand(6, generator=gen, dtype=F64) * 2 - 0.5  # some negative scales too
    shift = torch.randn(6, generator=gen, dtype=F64)
    fold_affine_into_conv(conv, scale, shift)
    assert conv.bias is not None and conv.weight.dtype == F64
    x = torch.randn(2, 4, 9, 7, generator=gen, dtype=F64)
    torch.testing.assert_close(
        conv(x), ref(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="output channels"):
        fold_affine_into_conv(conv, scale[:3], shift[:3])


@pytest.mark.parametrize("kind", FOLDABLE + ["GN+WS"])
def test_fold_small_net_float64(kind):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    net = _Net(kind).to(F64)
    d2norm.prepare_model(net)  # CBN history in float64
    net.train()
    with torch.no_grad():  # training forwards: running stats, CBN history, MABN buffers
        for _ in range(3):
            net(torch.randn(2, 3, 10, 10, generator=gen, dtype=F64) * 2 + 0.5)
    _randomize(net, gen)
    net.eval()
    folded = fold(copy.deepcopy(net))
    x = torch.randn(2, 3, 10, 10, generator=gen, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-10, atol=1e-10)
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())  # WS / centering baked
    if kind == "GN+WS":
        assert isinstance(folded.a.norm, GroupNormWS) and folded.fold_report["folded"] == []
    else:
        assert folded.a.norm is None and folded.b.norm is None
        assert [n for n, _ in folded.fold_report["folded"]] == ["a", "b"]
        assert not folded.a._forward_pre_hooks  # CBN's input hook is gone
    # the original (whose parametrized class deepcopy shares) is intact and still trainable
    net.train()
    net(torch.randn(2, 3, 10, 10, dtype=F64)).sum().backward()
    # a folded state dict loads into another folded model (no stale key-renaming hook)
    other = fold(_Net(kind).to(F64))
    other.load_state_dict(folded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x), folded(x), rtol=0, atol=0)


# ------------------------------------------------------------------ whole Mask R-CNN models
def _trained_model(norm, data_root, n_train=2):
    """Tiny Mask R-CNN after a few training forwards, norms' affine and stats randomized."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.utils.events import EventStorage

    cfg = synthetic_cfg(
        norm, **{"D2NORM.DATA.ROOT": data_root, "D2NORM.MABN.WARMUP_ITERS": 1, "D2NORM.MABN.BUFFER_SIZE": 2}
    )
    torch.manual_seed(0)
    model = d2norm.build_model(cfg)
    mapper = DatasetMapper(cfg, True)
    batches = [
        mapper(copy.deepcopy(d)) for d in DatasetCatalog.get("d2norm_shapes_tiny_train")[: 2 * n_train]
    ]
    model.train()
    with torch.no_grad(), EventStorage(0):
        for i in range(n_train):
            model(batches[2 * i : 2 * i + 2])
    _randomize(model, torch.Generator().manual_seed(3))
    return cfg, model.eval()


def _val_inputs(cfg, n=2):
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, False)
    return [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get("d2norm_shapes_tiny_val")[:n]]


def _assert_same_detections(ref, new):
    """Same detections (d2norm.detections tolerances), every one matched: same count and classes."""
    report = compare_detections(ref, new)
    counts = report["counts"]
    assert report["ok"], report
    assert counts["matched"] == counts["reference"] == counts["folded"] > 0, report


@pytest.mark.parametrize("norm", ["BN", "BN*", "SyncBN", "GN+WS", "CBN", "MABN"])
def test_folded_mask_rcnn_gives_the_same_detections(norm, data_root):
    cfg, model = _trained_model(norm, data_root, n_train=0 if norm == "BN*" else 1)
    inputs = _val_inputs(cfg)
    with torch.no_grad():
        ref = [model([x])[0]["instances"] for x in inputs]
        feats = model.backbone(model.preprocess_image(inputs[:1]).tensor)
    folded = fold(copy.deepcopy(model))
    report = folded.fold_report
    if norm == "GN+WS":
        assert report["folded"] == [] and {t for _, t in report["kept"]} == {"GroupNormWS"}
    else:
        assert len(report["folded"]) == len(convs_with_norm(model)) > 0 and report["kept"] == []
        assert not any(is_foldable(m) for m in folded.modules())
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    with torch.no_grad():
        new = [folded([x])[0]["instances"] for x in inputs]
        new_feats = folded.backbone(folded.preprocess_image(inputs[:1]).tensor)
    for k in feats:  # the part folding changes, relative to its scale
        err = (new_feats[k] - feats[k]).abs().max() / feats[k].abs().max()
        assert err < 1e-5, (k, err.item())
    _assert_same_detections(ref, new)


def _load_tool():
    path = os.path.join(REPO, "tools", "deploy.py")
    spec = importlib.util.spec_from_file_location("d2norm_tools_deploy", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_tool(recipe, out, weights, data_root, *opts, flags=()):
    """tools/deploy.py on the synthetic ``recipe`` with ``weights``: 2 tiny val images (96 px),
    1 timing round, to ``out``; ``flags``: more options; ``opts``: config overrides."""
    argv = ["--config-file", os.path.join(REPO, "configs", "synthetic", recipe), "--output", str(out)]
    argv += ["--num-images", "2", "--rounds", "1", *flags]
    argv += ["MODEL.WEIGHTS", weights, "D2NORM.DATA.ROOT", data_root]
    argv += [
        "DATASETS.TEST",
        "('d2norm_shapes_tiny_val',)",
        "INPUT.MIN_SIZE_TEST",
        "96",
        "INPUT.MAX_SIZE_TEST",
        "96",
    ]
    return _load_tool().main([*argv, *opts])


def test_tools_deploy_folds_checks_traces_and_saves(tmp_path, data_root):
    from d2norm.checkpoint import D2NormCheckpointer

    cfg, model = _trained_model("CBN", data_root)
    D2NormCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    weights = str(tmp_path / "model_final.pth")
    out = tmp_path / "deploy"
    opts = [
        # this model: CBN everywhere with the default window (the recipe: BN heads, window 4)
        "MODEL.ROI_BOX_HEAD.NORM",
        "CBN",
        "MODEL.ROI_MASK_HEAD.NORM",
        "CBN",
        "D2NORM.CBN.BUFFER_SIZE",
        "3",
    ]
    report = _run_tool("mask_rcnn_R_18_FPN_CBN.yaml", out, weights, data_root, *opts)
    det = report["detections"]
    assert det["ok"] and det["counts"]["matched"] == det["counts"]["reference"] > 0
    assert report["folded_layers"] == len(convs_with_norm(model)) > 0
    assert report["folded_norm_types"] == ["CrossIterationBatchNorm2d"]
    assert report["trace"]["what"].startswith("whole model")
    assert report["trace"]["max_abs_diff_vs_eager"] < 1e-4
    assert set(report["seconds_per_image"]) == {"unfolded", "folded", "traced"}
    assert {p.name for p in out.iterdir()} >= {"model_folded.pth", "model_traced.ts", "deploy_report.json"}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    # the saved folded weights rebuild the folded model; it reproduces the unfolded detections
    inputs = _val_inputs(cfg)
    loaded = load_folded_model(cfg, str(out / "model_folded.pth"))
    assert not any(is_foldable(m) for m in loaded.modules())
    with torch.no_grad():
        ref = [model([x])[0]["instances"] for x in inputs]
        new = [loaded([x])[0]["instances"] for x in inputs]
        raw = loaded.inference([{"image": inputs[1]["image"]}], do_postprocess=False)[0]
        traced_out = torch.jit.load(str(out / "model_traced.ts"))(inputs[1]["image"])
    _assert_same_detections(ref, new)
    # TorchScript outputs: boxes, classes, mask probabilities, scores, image size
    torch.testing.assert_close(traced_out[0], raw.pred_boxes.tensor, rtol=0, atol=1e-4)
    assert torch.equal(traced_out[1], raw.pred_classes)
    torch.testing.assert_close(traced_out[2], raw.pred_masks, rtol=0, atol=1e-5)
    torch.testing.assert_close(traced_out[3], raw.scores, rtol=0, atol=1e-5)


_LOAD_TS = """
import sys, torch
if sys.argv[2] == "with":
    import torchvision  # noqa: F401  (registers torchvision::nms / roi_align)
m = torch.jit.load(sys.argv[1])
out = m(torch.load(sys.argv[3]))
print("OK", len(out))
"""


@pytest.mark.slow
def test_tools_deploy_exports_frn_to_onnx_and_the_ts_loads_with_torchvision(tmp_path, data_root):
    """``--format torchscript --format onnx`` on a small FRN model (FRN's training path has no ONNX
    translation): onnxruntime's detections match the eager folded model's under the folding
    tolerances; the ``.ts`` loads in a fresh process with ``import torchvision`` and only then."""
    import subprocess
    import sys

    from d2norm.checkpoint import D2NormCheckpointer

    cfg, model = _trained_model("FRN", data_root, n_train=1)
    D2NormCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    out = tmp_path / "deploy"
    report = _run_tool(
        "mask_rcnn_R_18_FPN_FRN.yaml",
        out,
        str(tmp_path / "model_final.pth"),
        data_root,
        *[x for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD") for x in (f"MODEL.{k}.NORM", "FRN")],
        flags=("--format", "torchscript", "--format", "onnx"),
    )
    onnx_det = report["onnx"]["detections_vs_eager"]
    assert onnx_det["ok"], onnx_det
    assert onnx_det["counts"]["matched"] == onnx_det["counts"]["reference"] > 0
    assert report["onnx"]["max_abs_output_diff_vs_eager"] < 1e-3
    assert (out / "model.onnx").is_file() and "onnxruntime" in report["seconds_per_image"]
    # the ONNX graph holds FRN's math: no custom op, every parameter present
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")]

    image = str(tmp_path / "image.pt")
    torch.save(_val_inputs(cfg, 1)[0]["image"], image)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ts = str(out / "model_traced.ts")
    runs = {
        w: subprocess.run(
            [sys.executable, "-c", _LOAD_TS, ts, w, image], capture_output=True, text=True, env=env
        )
        for w in ("with", "without")
    }
    assert runs["with"].returncode == 0 and "OK 5" in runs["with"].stdout, runs["with"].stderr[-2000:]
    assert runs["without"].returncode != 0 and "torchvision" in runs["without"].stderr
