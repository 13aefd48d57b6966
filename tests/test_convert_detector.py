"""Whole detectors of the official CBN (mmdetection 0.6 fork) and MABN (maskrcnn-benchmark)
checkpoints, generated here with random values in their real key layouts (no downloads),
converted for d2norm recipes and checked against the source network recomputed by hand from the
file's own tensors.

Source layouts, as the official code builds them (Howal/Cross-iterationBatchNorm f6d3530,
megvii-model/MABN 995e8f5):

* mmdetection: ``ConvModule`` = ``.conv`` + norm ``.bn`` (``build_norm_layer``: 'bn' for BN / CBN,
  'gn' for GN), FPN ``neck.lateral_convs.{i}`` / ``neck.fpn_convs.{i}`` without conv bias when
  normalized; ``rpn_head.rpn_conv`` / ``rpn_cls`` (A sigmoid channels, or 2A softmax ones read as
  ``reshape(-1, 2)``) / ``rpn_reg`` (read as ``reshape(-1, 4)``); ``ConvFCBBoxHead``
  ``bbox_head.shared_convs.{i}``, ``shared_fcs.{i}``, ``fc_cls`` (81), ``fc_reg`` (4 x 81),
  target_stds (0.1, 0.1, 0.2, 0.2); ``FCNMaskHead`` ``mask_head.convs.{i}``, ``upsample``
  (deconv + ReLU), ``conv_logits`` (81).
* maskrcnn-benchmark: FPN ``backbone.fpn.fpn_inner{i}`` / ``fpn_layer{i}`` = Sequential(CenConv2d,
  MABN2d); ``rpn.head.conv`` / ``cls_logits`` / ``bbox_pred``; ``rpn.anchor_generator
  .cell_anchors.{l}``; ``FPNXconv1fcMABNFeatureExtractor`` ``xconvs`` = (CenConv2d, MABN2d, ReLU)
  x 4, ``fc6``; ``FPNPredictor`` ``cls_score`` (81) / ``bbox_pred`` (4 x 81), BBOX_REG_WEIGHTS
  (10, 10, 5, 5); ``mask_fcn{i}`` = Sequential(CenConv2d, MABN2d); ``conv5_mask`` (deconv + ReLU),
  ``mask_fcn_logits`` (81). MABN2d: weight, bias, running_var (1, C, 1, 1), iters (1,),
  buffer_x2 / buffer_gz (16, C); at eval ``w x / sqrt(running_var + eps) + b``; CenConv2d
  subtracts each filter's mean.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import REPO, synthetic_cfg

import d2norm
from d2norm import model_zoo
from d2norm.checkpoint import CheckpointError, D2NormCheckpointer
from d2norm.convert import INPUT_CONVENTIONS, convert_weights
from d2norm.convert_detector import legacy_cell_anchors, source_settings

from detectron2.structures import Boxes, Instances

K = 3  # the synthetic recipes' classes; the sources add background at index 0
# the input each source's weights were trained with (its check is tests/test_convert_weights.py)
_RGB = INPUT_CONVENTIONS["mmdet"]
_MRCNN = INPUT_CONVENTIONS["maskrcnn_benchmark"]


def _with_source_settings(cfg, parts=("fpn", "rpn", "roi_heads")):
    cfg.merge_from_list([str(x) for kv in source_settings(parts) for x in kv])
    return cfg


def _cbn_cfg(**kw):
    """The synthetic CBN recipe set up as the official CBN runs (FrozenStatsBN backbone)."""
    cfg = synthetic_cfg("CBN", **{**_RGB, "MODEL.RESNETS.NORM": "FrozenStatsBN", **kw})
    return _with_source_settings(cfg)


def _mabn_cfg(**kw):
    return _with_source_settings(synthetic_cfg("MABN", **{**_MRCNN, **kw}))


class _Gen:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, low=-1.0, high=1.0):
        return torch.rand(shape, generator=self.g, dtype=torch.float32) * (high - low) + low


def _bn(gen, c):
    return {
        "weight": gen(c, low=0.5, high=1.5),
        "bias": gen(c),
        "running_mean": gen(c),
        "running_var": gen(c, low=0.5, high=2.0),
    }


def _mabn(gen, c, buffer=16):
    return {
        "weight": gen(c, low=0.5, high=1.5),
        "bias": gen(c),
        "running_var": gen(1, c, 1, 1, low=0.5, high=2.0),
        "iters": torch.tensor([500]),
        "buffer_x2": gen(buffer, c, low=0.5, high=2.0),
        "buffer_gz": gen(buffer, c),
    }


def _conv(gen, cout, cin, k):
    return gen(cout, cin, k, k, low=-0.5, high=0.5) / (cin * k * k) ** 0.5


def mmdet_detector(
    gen,
    ins=(64, 128, 256, 512),
    dim=64,
    box_convs=4,
    fc=256,
    classes=K + 1,
    mask_convs=2,
    fcs=1,
    anchors=3,
    softmax_rpn=False,
    norm="bn",
):
    """An mmdetection 0.6 / v1 Mask R-CNN (FPN, RPN, 4conv1fc box head, FCN mask head) with a
    norm after every FPN / head conv, as the official CBN configs (``normalize=`` on neck,
    bbox_head and mask_head)."""
    sd = {}

    def conv_module(prefix, cout, cin, k):
        sd[f"{prefix}.conv.weight"] = _conv(gen, cout, cin, k)
        stats = _bn(gen, cout) if norm == "bn" else {"weight": gen(cout), "bias": gen(cout)}
        sd.update({f"{prefix}.{norm}.{n}": v for n, v in stats.items()})

    for i, c in enumerate(ins):
        conv_module(f"neck.lateral_convs.{i}", dim, c, 1)
        conv_module(f"neck.fpn_convs.{i}", dim, dim, 3)
    sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"] = _conv(gen, dim, dim, 3), gen(dim)
    ch = anchors * (2 if softmax_rpn else 1)
    sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"] = _conv(gen, ch, dim, 1), gen(ch)
    sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"] = (
        _conv(gen, 4 * anchors, dim, 1),
        gen(4 * anchors),
    )
    for i in range(box_convs):
        conv_module(f"bbox_head.shared_convs.{i}", dim, dim, 3)
    for j in range(fcs):  # the first fc reads the (C, 7, 7) features flattened
        fan_in = dim * 49 if j == 0 else fc
        sd[f"bbox_head.shared_fcs.{j}.weight"] = gen(fc, fan_in) / fan_in**0.5
        sd[f"bbox_head.shared_fcs.{j}.bias"] = gen(fc)
    sd["bbox_head.fc_cls.weight"], sd["bbox_head.fc_cls.bias"] = gen(classes, fc), gen(classes)
    sd["bbox_head.fc_reg.weight"] = gen(4 * classes, fc) * 0.1
    sd["bbox_head.fc_reg.bias"] = gen(4 * classes) * 0.1
    for i in range(mask_convs):
        conv_module(f"mask_head.convs.{i}", dim, dim, 3)
    sd["mask_head.upsample.weight"], sd["mask_head.upsample.bias"] = _conv(gen, dim, dim, 2), gen(dim)
    sd["mask_head.conv_logits.weight"] = _conv(gen, classes, dim, 1)
    sd["mask_head.conv_logits.bias"] = gen(classes)
    return sd


def mrcnn_detector(
    gen, ins=(64, 128, 256, 512), dim=64, box_convs=4, fc=256, classes=K + 1, mask_convs=2, fcs=1
):
    """A maskrcnn-benchmark Mask R-CNN as the official MABN config builds it (CenConv2d + MABN2d
    in FPN, the Xconv1fc box head and the mask head)."""
    sd = {}

    def block(prefix, cout, cin, k, sep="."):
        sd[f"{prefix}{sep}0.weight"] = _conv(gen, cout, cin, k)
        sd.update({f"{prefix}{sep}1.{n}": v for n, v in _mabn(gen, cout).items()})

    for i, c in enumerate(ins, 1):
        block(f"backbone.fpn.fpn_inner{i}", dim, c, 1)
        block(f"backbone.fpn.fpn_layer{i}", dim, dim, 3)
    sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"] = _conv(gen, dim, dim, 3), gen(dim)
    sd["rpn.head.cls_logits.weight"], sd["rpn.head.cls_logits.bias"] = _conv(gen, 3, dim, 1), gen(3)
    sd["rpn.head.bbox_pred.weight"], sd["rpn.head.bbox_pred.bias"] = _conv(gen, 12, dim, 1), gen(12)
    for level, (stride, size) in enumerate(zip((4, 8, 16, 32, 64), (32, 64, 128, 256, 512))):
        sd[f"rpn.anchor_generator.cell_anchors.{level}"] = legacy_cell_anchors(
            "maskrcnn_benchmark", stride, size
        ).float()
    xconvs = "roi_heads.box.feature_extractor.xconvs"
    for i in range(box_convs):
        sd[f"{xconvs}.{3 * i}.weight"] = _conv(gen, dim, dim, 3)
        sd.update({f"{xconvs}.{3 * i + 1}.{n}": v for n, v in _mabn(gen, dim).items()})
    for j in range(fcs):  # fc6, fc7 (FPN2MLPFeatureExtractor)
        fan_in = dim * 49 if j == 0 else fc
        sd[f"roi_heads.box.feature_extractor.fc{6 + j}.weight"] = gen(fc, fan_in) / fan_in**0.5
        sd[f"roi_heads.box.feature_extractor.fc{6 + j}.bias"] = gen(fc)
    sd["roi_heads.box.predictor.cls_score.weight"] = gen(classes, fc)
    sd["roi_heads.box.predictor.cls_score.bias"] = gen(classes)
    sd["roi_heads.box.predictor.bbox_pred.weight"] = gen(4 * classes, fc) * 0.1
    sd["roi_heads.box.predictor.bbox_pred.bias"] = gen(4 * classes) * 0.1
    for i in range(1, mask_convs + 1):
        block(f"roi_heads.mask.feature_extractor.mask_fcn{i}", dim, dim, 3)
    sd["roi_heads.mask.predictor.conv5_mask.weight"] = _conv(gen, dim, dim, 2)
    sd["roi_heads.mask.predictor.conv5_mask.bias"] = gen(dim)
    sd["roi_heads.mask.predictor.mask_fcn_logits.weight"] = _conv(gen, classes, dim, 1)
    sd["roi_heads.mask.predictor.mask_fcn_logits.bias"] = gen(classes)
    return sd


def _tv_backbone(depth=18):
    torch.manual_seed(3)
    net = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def mmdet_file(tmp_path, detector, depth=18):
    sd = {"backbone." + k: v for k, v in _tv_backbone(depth).items()}
    path = str(tmp_path / "cbn_mask_rcnn.pth")
    torch.save({"state_dict": {**sd, **detector}, "meta": {"mmdet_version": "0.6.rc0+118edde"}}, path)
    return path


def mrcnn_file(tmp_path, detector, depth=18):
    sd = {}
    for k, v in _tv_backbone(depth).items():
        if k.endswith(("running_mean", "num_batches_tracked")):
            continue  # MABN keeps no running mean
        k = "stem." + k if k.startswith(("conv1.", "bn1.")) else k
        sd["module.backbone.body." + k] = v
    detector = {"module." + k: v for k, v in detector.items()}
    path = str(tmp_path / "mabn_mask_rcnn.pth")
    torch.save({"model": {**sd, **detector}, "iteration": 180000}, path)
    return path


def _load(cfg, state):
    model = d2norm.build_model(cfg)
    model.load_state_dict({**model.state_dict(), **state})
    return model.eval()


# --- the source networks, recomputed from the file's tensors ----------------------------------


def _src_norm(sd, prefix, x, kind):
    if kind == "bn":
        return F.batch_norm(
            x,
            sd[prefix + "running_mean"],
            sd[prefix + "running_var"],
            sd[prefix + "weight"],
            sd[prefix + "bias"],
            eps=1e-5,
        )
    var = sd[prefix + "running_var"].reshape(1, -1, 1, 1)
    return x / (var + 1e-5).sqrt() * sd[prefix + "weight"].view(1, -1, 1, 1) + sd[prefix + "bias"].view(
        1, -1, 1, 1
    )


def _src_conv(sd, key, x, centered, padding):
    w = sd[key]
    if centered:  # CenConv2d
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return F.conv2d(x, w, sd.get(key[: -len("weight")] + "bias"), padding=padding)


def _src_conv_norm(sd, conv_key, norm_prefix, x, kind, padding):
    return _src_norm(sd, norm_prefix, _src_conv(sd, conv_key, x, kind == "mabn", padding), kind)


def _src_fpn(sd, feats, source):
    """The source FPN on bottom-up features res2-res5: laterals, top-down nearest x2 sum, output
    convs, P6 = max_pool(P5, 1, stride 2)."""
    kind = "bn" if source == "mmdet" else "mabn"

    def names(i, out):
        if source == "mmdet":
            p = f"neck.{'fpn_convs' if out else 'lateral_convs'}.{i}"
            return p + ".conv.weight", p + ".bn."
        p = f"backbone.fpn.{'fpn_layer' if out else 'fpn_inner'}{i + 1}"
        return p + ".0.weight", p + ".1."

    lat = [_src_conv_norm(sd, *names(i, False), f, kind, 0) for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2, mode="nearest")
    outs = [_src_conv_norm(sd, *names(i, True), x, kind, 1) for i, x in enumerate(lat)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def _src_box_head(sd, x, source):
    """``(class probabilities (R, K+1), deltas (R, 4 (K+1)))`` of the source box head: its
    convs (conv, norm, ReLU), then its fcs (ReLU) on the features flattened as (C, H, W)."""
    if source == "mmdet":
        convs = [
            (f"bbox_head.shared_convs.{i}.conv.weight", f"bbox_head.shared_convs.{i}.bn.") for i in range(4)
        ]
        fcs = [f"bbox_head.shared_fcs.{j}." for j in range(2)]
        cls, reg = "bbox_head.fc_cls.", "bbox_head.fc_reg."
    else:
        p = "roi_heads.box.feature_extractor."
        convs = [(f"{p}xconvs.{3 * i}.weight", f"{p}xconvs.{3 * i + 1}.") for i in range(4)]
        fcs = [f"{p}fc6.", f"{p}fc7."]
        cls, reg = "roi_heads.box.predictor.cls_score.", "roi_heads.box.predictor.bbox_pred."
    kind = "bn" if source == "mmdet" else "mabn"
    for conv, norm in (c for c in convs if c[0] in sd):
        x = F.relu(_src_conv_norm(sd, conv, norm, x, kind, 1))
    x = x.flatten(1)
    for fc in (f for f in fcs if f + "weight" in sd):
        x = F.relu(F.linear(x, sd[fc + "weight"], sd[fc + "bias"]))
    scores = F.linear(x, sd[cls + "weight"], sd[cls + "bias"]).softmax(-1)
    return scores, F.linear(x, sd[reg + "weight"], sd[reg + "bias"])


def _src_mask_logits(sd, x, source):
    if source == "mmdet":
        for i in range(2):
            p = f"mask_head.convs.{i}"
            x = F.relu(_src_conv_norm(sd, p + ".conv.weight", p + ".bn.", x, "bn", 1))
        up, logits = "mask_head.upsample.", "mask_head.conv_logits."
    else:
        for i in range(1, 3):
            p = f"roi_heads.mask.feature_extractor.mask_fcn{i}"
            x = F.relu(_src_conv_norm(sd, p + ".0.weight", p + ".1.", x, "mabn", 1))
        up, logits = "roi_heads.mask.predictor.conv5_mask.", "roi_heads.mask.predictor.mask_fcn_logits."
    x = F.relu(F.conv_transpose2d(x, sd[up + "weight"], sd[up + "bias"], stride=2))
    return F.conv2d(x, sd[logits + "weight"], sd[logits + "bias"])


def _legacy_decode(boxes, deltas, source):
    """The sources' box decoding on pixel-index boxes (``x2`` inclusive), transcribed:
    mmdetection ``delta2bbox`` (deltas x target_stds (0.1, 0.1, 0.2, 0.2); widths ``x2 - x1 + 1``;
    centers ``(x1 + x2) / 2``; corners ``g -/+ w / 2 +/- 0.5``); maskrcnn-benchmark
    ``BoxCoder.decode`` (deltas / (10, 10, 5, 5); widths + 1; centers ``x1 + w / 2``; corners
    ``c - w / 2`` and ``c + w / 2 - 1``)."""
    d = deltas.double().view(len(deltas), -1, 4) * torch.tensor([0.1, 0.1, 0.2, 0.2], dtype=torch.float64)
    b = boxes.double()
    w, h = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
    if source == "mmdet":
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    else:
        cx, cy = b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h
    gx = cx[:, None] + w[:, None] * d[..., 0]
    gy = cy[:, None] + h[:, None] * d[..., 1]
    gw, gh = w[:, None] * d[..., 2].exp(), h[:, None] * d[..., 3].exp()
    if source == "mmdet":
        out = [gx - gw / 2 + 0.5, gy - gh / 2 + 0.5, gx + gw / 2 - 0.5, gy + gh / 2 - 0.5]
    else:
        out = [gx - gw / 2, gy - gh / 2, gx + gw / 2 - 1, gy + gh / 2 - 1]
    return torch.stack(out, -1)  # (R, K+1, 4), pixel-index corners


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["mmdet", "maskrcnn_benchmark"])
def test_whole_detector_computes_what_the_source_computes(tmp_path, source):
    gen = _Gen(7)
    if source == "mmdet":
        src, cfg = mmdet_detector(gen), _cbn_cfg()
        path = mmdet_file(tmp_path, src)
    else:
        src, cfg = mrcnn_detector(gen), _mabn_cfg()
        path = mrcnn_file(tmp_path, src)
    state, info = convert_weights(cfg, path)
    assert info["source"] == source
    assert info["parts"] == ["backbone", "fpn", "rpn", "roi_heads"]
    assert info["not_converted"] == []
    fresh = [n for n in info["approximations"] if n.startswith("norm state")]
    if source == "mmdet":  # CBN's window and iteration count are not in the official files
        assert "hist_sqmean" in fresh[0] and "burns in again" in fresh[0]
    else:  # the official MABN layout holds all of MABN's state
        assert fresh == []
    # the output loads by exact names into the recipe's model, as MODEL.WEIGHTS does
    out = str(tmp_path / "out.pth")
    torch.save({"model": state}, out)
    model = d2norm.build_model(cfg)
    D2NormCheckpointer(model).load(out)
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # FPN
        images = torch.rand(1, 3, 64, 96, generator=g) * 255
        bottom = model.backbone.bottom_up(images)
        feats = model.backbone(images)
        want = _src_fpn(src, [bottom[f"res{i}"] for i in range(2, 6)], source)
        for i, name in enumerate(["p2", "p3", "p4", "p5", "p6"]):
            torch.testing.assert_close(feats[name], want[i], rtol=1e-4, atol=1e-4)
        # RPN: object probability and deltas per (location, anchor), in the source's flattening
        p = feats["p3"]
        logits, deltas = model.proposal_generator.rpn_head([p])
        rpn = "rpn_head.rpn_" if source == "mmdet" else "rpn.head."
        cls, reg = ("cls", "reg") if source == "mmdet" else ("cls_logits", "bbox_pred")
        hidden = F.relu(F.conv2d(p, src[rpn + "conv.weight"], src[rpn + "conv.bias"], padding=1))
        src_cls = F.conv2d(hidden, src[f"{rpn}{cls}.weight"], src[f"{rpn}{cls}.bias"])[0]
        src_reg = F.conv2d(hidden, src[f"{rpn}{reg}.weight"], src[f"{rpn}{reg}.bias"])[0]
        torch.testing.assert_close(
            logits[0].permute(0, 2, 3, 1).reshape(-1).sigmoid(),
            src_cls.permute(1, 2, 0).reshape(-1).sigmoid(),
        )
        d2_deltas = deltas[0].view(1, 3, 4, *p.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        torch.testing.assert_close(d2_deltas, src_reg.permute(1, 2, 0).reshape(-1, 4))
        # box head: class probabilities (background last) and decoded class boxes
        rois = torch.randn(6, 64, 7, 7, generator=g)
        scores, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(rois))
        probs = scores.softmax(-1)
        src_probs, src_deltas = _src_box_head(src, rois, source)
        torch.testing.assert_close(probs[:, :K], src_probs[:, 1:], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(probs[:, K], src_probs[:, 0], rtol=1e-4, atol=1e-6)
        x1y1 = torch.rand(6, 2, generator=g) * 50
        legacy = torch.cat([x1y1, x1y1 + 5 + torch.rand(6, 2, generator=g) * 40], 1)  # x2, y2 inclusive
        inst = Instances((96, 96), proposal_boxes=Boxes(legacy + torch.tensor([0.0, 0.0, 1.0, 1.0])))
        boxes = model.roi_heads.box_predictor.predict_boxes((scores, box_deltas), [inst])[0].view(6, K, 4)
        src_boxes = _legacy_decode(legacy, src_deltas, source)[:, 1:] + torch.tensor(
            [0.0, 0.0, 1.0, 1.0], dtype=torch.float64
        )
        torch.testing.assert_close(boxes.double(), src_boxes, rtol=1e-5, atol=1e-3)
        # mask head: class c's logits are the source's channel c + 1
        mask_rois = torch.randn(4, 64, 14, 14, generator=g)
        masks = model.roi_heads.mask_head.layers(mask_rois)
        src_masks = _src_mask_logits(src, mask_rois, source)
    assert masks.shape == (4, K, 28, 28)
    torch.testing.assert_close(masks, src_masks[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["mmdet", "maskrcnn_benchmark"])
def test_a_2fc_box_head_maps_to_detectron2s_fc_head(tmp_path, source):
    """The plain FPN box head (no convs, two fcs: mmdetection SharedFCBBoxHead, maskrcnn-benchmark
    FPN2MLPFeatureExtractor fc6 / fc7) into a recipe with NUM_CONV 0, NUM_FC 2: the first fc
    reads the pooled (C, 7, 7) features flattened in the same order."""
    gen = _Gen(11)
    head = {"ROI_BOX_HEAD.NUM_CONV": 0, "ROI_BOX_HEAD.NUM_FC": 2}
    over = {f"MODEL.{k}": v for k, v in head.items()}
    if source == "mmdet":
        src, cfg = mmdet_detector(gen, box_convs=0, fcs=2), _cbn_cfg(**over)
        path = mmdet_file(tmp_path, src)
    else:
        src, cfg = mrcnn_detector(gen, box_convs=0, fcs=2), _mabn_cfg(**over)
        path = mrcnn_file(tmp_path, src)
    state, _ = convert_weights(cfg, path, parts=["fpn", "roi_heads"])
    model = _load(cfg, state)
    rois = torch.randn(5, 64, 7, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scores, _ = model.roi_heads.box_predictor(model.roi_heads.box_head(rois))
        src_probs, _ = _src_box_head(src, rois, source)
    torch.testing.assert_close(scores.softmax(-1)[:, :K], src_probs[:, 1:], rtol=1e-4, atol=1e-6)
    # the same file into the 4conv1fc recipe is refused, naming what is missing
    with pytest.raises(
        CheckpointError, match=r"roi_heads\.box_head\.fc2\.weight: file \(256, 256\), no such tensor"
    ):
        convert_weights(_cbn_cfg() if source == "mmdet" else _mabn_cfg(), path, parts=["fpn", "roi_heads"])


def test_source_anchor_generators_match_transcribed_values():
    # py-faster-rcnn / Detectron generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=8) as
    # printed by lib/rpn/generate_anchors.py (rows of scale 8), which maskrcnn-benchmark keeps:
    # size 128 at stride 16
    want = [[-84.0, -40.0, 99.0, 55.0], [-56.0, -56.0, 71.0, 71.0], [-36.0, -80.0, 51.0, 95.0]]
    assert legacy_cell_anchors("maskrcnn_benchmark", 16, 128).tolist() == want
    # mmdetection AnchorGenerator(base_size=4, scales=[8], ratios=[0.5, 1, 2]) by hand:
    # w = 32 / sqrt(r), h = 32 sqrt(r), center 1.5, corners 1.5 -/+ (w - 1) / 2 rounded
    # (r = 0.5: w = 45.25, h = 22.63 -> -20.63, -9.31, 23.63, 12.31 -> -21, -9, 24, 12)
    want = [[-21.0, -9.0, 24.0, 12.0], [-14.0, -14.0, 17.0, 17.0], [-9.0, -21.0, 12.0, 24.0]]
    assert legacy_cell_anchors("mmdet", 4, 32).tolist() == want


@pytest.mark.parametrize("source, bound", [("mmdet", 0.5), ("maskrcnn_benchmark", 4.0)])
def test_rpn_anchor_residual_is_reported(tmp_path, source, bound):
    gen = _Gen(1)
    if source == "mmdet":
        path, cfg = mmdet_file(tmp_path, mmdet_detector(gen)), _cbn_cfg()
    else:
        path, cfg = mrcnn_file(tmp_path, mrcnn_detector(gen)), _mabn_cfg()
    _, info = convert_weights(cfg, path, parts=["rpn"])
    (note,) = [n for n in info["approximations"] if n.startswith("anchors")]
    residual = float(note.split("up to ")[1].split(" px")[0])
    # detectron2's anchors at OFFSET 0.5 vs the source's (in continuous coordinates):
    # mmdetection rounds each corner (<= 0.5 px); maskrcnn-benchmark rounds at the base size
    # and scales by 8 (at stride 64, ratio 0.5: 728 x 368 vs 724.08 x 362.04, 3 px per side)
    assert 0 < residual <= bound
    assert info["parts"] == ["backbone", "rpn"]
    assert any("roi_heads" in k or "bbox_head" in k for k in info["not_converted"])


def test_softmax_rpn_becomes_the_logit_difference(tmp_path):
    src = mmdet_detector(_Gen(2), softmax_rpn=True)
    state, _ = convert_weights(_cbn_cfg(), mmdet_file(tmp_path, src), parts=["fpn", "rpn"])
    model = _load(_cbn_cfg(), state)
    p = torch.randn(1, 64, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        (logits,), _ = model.proposal_generator.rpn_head([p])
        hidden = F.relu(
            F.conv2d(p, src["rpn_head.rpn_conv.weight"], src["rpn_head.rpn_conv.bias"], padding=1)
        )
        two = F.conv2d(hidden, src["rpn_head.rpn_cls.weight"], src["rpn_head.rpn_cls.bias"])[0]
    # mmdetection's softmax RPN: cls_score.permute(1, 2, 0).reshape(-1, 2).softmax(-1)[:, 1]
    want = two.permute(1, 2, 0).reshape(-1, 2).softmax(-1)[:, 1]
    torch.testing.assert_close(logits[0].permute(1, 2, 0).reshape(-1).sigmoid(), want)


def test_recipe_settings_that_differ_are_refused(tmp_path):
    path = mmdet_file(tmp_path, mmdet_detector(_Gen(3)))
    cfg = _cbn_cfg()
    cfg.merge_from_list(
        ["MODEL.ANCHOR_GENERATOR.OFFSET", "0.0", "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2"]
    )
    with pytest.raises(
        ValueError,
        match=r"ANCHOR_GENERATOR\.OFFSET is 0\.0, the mmdet detector used 0\.5.*POOLER_TYPE is 'ROIAlignV2'",
    ):
        convert_weights(cfg, path)
    # the backbone alone needs none of them; the detector parts are then listed, not converted
    _, info = convert_weights(cfg, path, parts=["backbone"])
    assert info["parts"] == ["backbone"] and "bbox_head.fc_cls.weight" in info["not_converted"]
    # without the check the parts convert (the user takes the difference on)
    _, info = convert_weights(cfg, path, check_settings=False)
    assert info["parts"] == ["backbone", "fpn", "rpn", "roi_heads"]
    with pytest.raises(CheckpointError, match=r"holds only \['backbone'\], not \['rpn'\]"):
        convert_weights(cfg, mmdet_file(tmp_path, {}), parts=["rpn"])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"box_convs": 2}, r"tensors the file does not provide: \['roi_heads\.box_head\.conv3\.norm\.bias'"),
        ({"norm": "gn"}, r"backbone\.fpn_lateral2\.norm\.running_mean"),
        (
            {"classes": 5},
            r"fc_cls\.weight -> roi_heads\.box_predictor\.cls_score\.weight: file \(5, 256\), model \(4, 256",
        ),
        ({"anchors": 9}, r"anchor_deltas\.weight: file \(36, 64, 1, 1\), model \(12, 64, 1, 1\)"),
    ],
)
def test_architectures_that_differ_are_refused(tmp_path, change, match):
    path = mmdet_file(tmp_path, mmdet_detector(_Gen(4), **change))
    with pytest.raises(CheckpointError, match=match):
        convert_weights(_cbn_cfg(), path)


def test_parts_without_a_detectron2_counterpart_are_refused(tmp_path):
    gen = _Gen(5)
    src = mmdet_detector(gen)
    extra = {"neck.fpn_convs.4.conv.weight": _conv(gen, 64, 512, 3), **_bn_keys(gen, "neck.fpn_convs.4.bn.")}
    with pytest.raises(CheckpointError, match=r"extra convs.*neck\.fpn_convs\.4\.conv\.weight.*max-pooling"):
        convert_weights(_cbn_cfg(), mmdet_file(tmp_path, {**src, **extra}))
    branch = {"bbox_head.cls_convs.0.conv.weight": _conv(gen, 64, 64, 3)}
    with pytest.raises(CheckpointError, match=r"no counterpart.*bbox_head\.cls_convs\.0\.conv\.weight"):
        convert_weights(_cbn_cfg(), mmdet_file(tmp_path, {**src, **branch}))
    # a maskrcnn-benchmark RPN trained with other anchors (sizes 16-256)
    src = mrcnn_detector(gen)
    src["rpn.anchor_generator.cell_anchors.0"] = legacy_cell_anchors("maskrcnn_benchmark", 4, 16).float()
    with pytest.raises(
        CheckpointError, match=r"cell_anchors\.0 of the file is .* not the anchors of size 32"
    ):
        convert_weights(_mabn_cfg(), mrcnn_file(tmp_path, src))
    _, info = convert_weights(_mabn_cfg(), mrcnn_file(tmp_path, src), parts=["fpn", "roi_heads"])
    assert "rpn.head.conv.weight" in info["not_converted"]


def test_mabn_history_of_another_buffer_size_restarts(tmp_path):
    # the official files hold 16-entry MABN rings (real_B / B = 32 / 2); a recipe with 8 keeps
    # running_var and the affine parameters and starts its rings empty, as MODEL.WEIGHTS does
    src = mrcnn_detector(_Gen(9))
    cfg = _mabn_cfg(**{"D2NORM.MABN.BUFFER_SIZE": 8})
    state, info = convert_weights(cfg, mrcnn_file(tmp_path, src), parts=["fpn", "roi_heads"])
    (note,) = [n for n in info["approximations"] if n.startswith("norm state")]
    assert "buffer_x2" in note and int(state["roi_heads.box_head.conv2.norm.iters"]) == 0
    torch.testing.assert_close(
        state["roi_heads.box_head.conv2.norm.running_var"],
        src["roi_heads.box.feature_extractor.xconvs.4.running_var"].flatten(),
    )
    assert "roi_heads.box_head.conv2.norm.buffer_x2" not in state


def _bn_keys(gen, prefix):
    return {prefix + k: v for k, v in _bn(gen, 64).items()}


def _coco(name):
    cfg = model_zoo.get_config(name)
    cfg.MODEL.DEVICE = "cpu"
    return _with_source_settings(cfg)


def test_coco_mabn_recipe_loads_the_official_layout(tmp_path):
    """The COCO Mask R-CNN R-50 MABN recipe and a maskrcnn-benchmark file of the official MABN
    config's shapes (R-50, FPN 256, 4 x 256 convs + fc 1024, 81 classes, 4 mask convs)."""
    gen = _Gen(6)
    src = mrcnn_detector(gen, ins=(256, 512, 1024, 2048), dim=256, fc=1024, classes=81, mask_convs=4)
    path = mrcnn_file(tmp_path, src, depth=50)
    state, info = convert_weights(_coco("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml"), path)
    assert info["not_converted"] == []
    cls = state["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls[80], src["roi_heads.box.predictor.cls_score.weight"][0])  # background last
    assert torch.equal(cls[:80], src["roi_heads.box.predictor.cls_score.weight"][1:])
    raw = src["roi_heads.mask.feature_extractor.mask_fcn4.0.weight"]
    assert torch.equal(state["roi_heads.mask_head.mask_fcn4.parametrizations.weight.original"], raw)
    torch.testing.assert_close(
        state["backbone.fpn_output5.norm.running_var"], src["backbone.fpn.fpn_layer4.1.running_var"].flatten()
    )


def test_tool_converts_the_coco_cbn_recipe(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "convert_tool", os.path.join(REPO, "tools", "convert_weights.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    gen = _Gen(8)
    src = mmdet_detector(gen, ins=(256, 512, 1024, 2048), dim=256, fc=1024, classes=81, mask_convs=4)
    path = mmdet_file(tmp_path, src, depth=50)
    recipe = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml"
    out = str(tmp_path / "out.pth")
    with pytest.raises(ValueError, match="--match-source adds them"):
        tool.main(["--config-file", recipe, path, out])
    info = tool.main(["--match-source", "--config-file", recipe, path, out])
    printed = capsys.readouterr().out
    assert info["parts"] == ["backbone", "fpn", "rpn", "roi_heads"]
    assert "MODEL.ANCHOR_GENERATOR.OFFSET 0.5" in printed and "Not reproduced exactly: anchors" in printed
    saved = torch.load(out, weights_only=True)
    assert saved["d2norm_convert"]["settings"] == info["settings"]
    reg = saved["model"]["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(reg, src["bbox_head.fc_reg.weight"][4:])  # background's 4 rows dropped
