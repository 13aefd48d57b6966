"""WS convention from the config, folding WS for deployment, and loading pretrained files.

References are independent of the code under test: WS is recomputed in float64 from its
formula; Caffe2 names are produced by the test from detectron2's naming rules (the reverse
direction of the loader); torchvision files come from ``torchvision.models.resnet18`` and are
compared module by module against the model.
"""

import pickle

import numpy as np
import pytest
import torch
from helpers import c2_name, convs_with_norm, synthetic_cfg, torchvision_module_pairs
from torch import nn

import d2norm
from d2norm.checkpoint import CheckpointError, D2NormCheckpointer, load_pretrained_backbone
from d2norm.deploy import fold_weight_standardization, has_weight_transforms
from d2norm.layers import GroupNormWS
from d2norm.layers.weight_transforms import WeightStandardization, get_weight_transform
from d2norm.weights import convert_torchvision_resnet


def _build(norm, **overrides):
    cfg = synthetic_cfg(norm, **{"MODEL.DEVICE": "cpu", **overrides})
    return cfg, d2norm.build_model(cfg)


_MODELS = {}


def _model(norm):
    """One synthetic model per norm for the loading tests (each load overwrites what it checks)."""
    if norm not in _MODELS:
        torch.manual_seed(0)
        _MODELS[norm] = _build(norm)[1]
    return _MODELS[norm]


def _ws_reference(w, eps, convention):
    """Weight standardization in float64 numpy, straight from the formulas."""
    w = w.detach().double().numpy()
    flat = w.reshape(w.shape[0], -1)
    n = flat.shape[1]
    mean = flat.mean(axis=1, keepdims=True)
    if convention == "sqrt_var":
        denom = np.sqrt(((flat - mean) ** 2).sum(axis=1, keepdims=True) / n + eps)
    else:
        denom = np.sqrt(((flat - mean) ** 2).sum(axis=1, keepdims=True) / (n - 1)) + eps
    return torch.from_numpy(((flat - mean) / denom).reshape(w.shape))


def _ws_convs(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and isinstance(getattr(m, "norm", None), GroupNormWS)
    ]


# ----------------------------------------------------------------------------- WS convention
def test_ws_convention_and_eps_come_from_the_config():
    eps = 1e-2  # large enough that its placement changes the result visibly
    weights = {}
    for convention in ("sqrt_var", "std_plus_eps"):
        torch.manual_seed(0)
        _, model = _build("GN+WS", **{"D2NORM.WS.CONVENTION": convention, "D2NORM.WS.EPS": eps})
        convs = _ws_convs(model)
        assert len(convs) > 20
        for conv in convs:
            t = get_weight_transform(conv)
            assert isinstance(t, WeightStandardization)
            assert (t.convention, t.eps, conv.norm.ws_convention) == (convention, eps, convention)
            raw = conv.parametrizations.weight.original
            torch.testing.assert_close(
                conv.weight.double(), _ws_reference(raw, eps, convention), rtol=1e-5, atol=1e-6
            )
        weights[convention] = convs[0].weight.detach().clone()
    # the two conventions give different kernels (so the check above can tell them apart)
    assert not torch.allclose(weights["sqrt_var"], weights["std_plus_eps"], rtol=1e-3, atol=0)


def test_ws_default_convention_is_sqrt_var():
    from detectron2.config import get_cfg

    cfg = d2norm.add_d2norm_config(get_cfg())
    assert (cfg.D2NORM.WS.CONVENTION, cfg.D2NORM.WS.EPS) == ("sqrt_var", 1e-5)
    norm = GroupNormWS(32, 64)
    assert (norm.ws_convention, norm.ws_eps) == ("sqrt_var", 1e-5)


def test_bad_ws_convention_names_the_config_key():
    with pytest.raises(ValueError) as e:
        _build("GN+WS", **{"D2NORM.WS.CONVENTION": "std"})
    msg = str(e.value)
    assert "D2NORM.WS.CONVENTION" in msg and "'std'" in msg and "std_plus_eps" in msg


# ----------------------------------------------------------------------------- deploy
def _images(n=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), generator=g).float(), "height": size, "width": size}
        for _ in range(n)
    ]


def test_fold_weight_standardization_keeps_the_outputs():
    torch.manual_seed(0)
    cfg, model = _build("GN+WS", **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    model.eval()
    images = _images()
    with torch.no_grad():
        feats_before = model.backbone(model.preprocess_image(images).tensor)
        before = model(images)
    expected = {
        id(c): _ws_reference(c.parametrizations.weight.original, 1e-5, "sqrt_var") for c in _ws_convs(model)
    }
    assert sum(len(o["instances"]) for o in before) > 0  # something to compare

    assert fold_weight_standardization(model) is model
    assert not has_weight_transforms(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    for conv in [m for m in model.modules() if id(m) in expected]:
        assert type(conv.weight) is nn.Parameter and get_weight_transform(conv) is None
        torch.testing.assert_close(conv.weight.double(), expected[id(conv)], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        feats_after = model.backbone(model.preprocess_image(images).tensor)
        after = model(images)
    tol = dict(rtol=1e-5, atol=1e-5)  # the tolerance fold_weight_standardization documents
    for k in feats_before:
        torch.testing.assert_close(feats_after[k], feats_before[k], **tol)
    for b, a in zip(before, after):
        b, a = b["instances"], a["instances"]
        assert len(a) == len(b)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, **tol)
        torch.testing.assert_close(a.scores, b.scores, **tol)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.pred_masks.float(), b.pred_masks.float())

    # the folded weights run in a plain GN model: no d2norm transform needed at inference
    _, plain = _build("GN", **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        again = plain(images)
    for b, a in zip(before, again):
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores, **tol)


def test_fold_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fold_weight_standardization({"weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- pretrained files
def _plain(k):
    return k.replace("parametrizations.weight.original", "weight")


def _bottom_up_state(model):
    prefix = "backbone.bottom_up."
    return {_plain(k)[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("norm,container", [("GN", "plain"), ("GN+WS", "blobs"), ("GN+WS", "model+author")])
def test_caffe2_pkl_loads_into_gn_backbones(tmp_path, norm, container):
    model = _model(norm)
    g = torch.Generator().manual_seed(1)
    file_tensors = {}
    for d2_name, v in _bottom_up_state(model).items():
        file_tensors[c2_name(d2_name)] = torch.randn(v.shape, generator=g).numpy()
    assert any(k.endswith("_gn_s") for k in file_tensors)
    extra = {
        "pred_w": np.zeros((10, 512), np.float32),
        "pred_b": np.zeros(10, np.float32),
        "res2_0_branch2a_w_momentum": np.zeros(1, np.float32),
    }  # classifier, solver state
    blobs = {**file_tensors, **extra}
    data = {
        "plain": blobs,
        "blobs": {"blobs": blobs, "cfg": "..."},
        "model+author": {"model": blobs, "__author__": "Caffe2"},
    }[container]
    path = str(tmp_path / "R-18-GN.pkl")
    with open(path, "wb") as f:
        pickle.dump(data, f)

    D2NormCheckpointer(model).load(path)

    bu = model.backbone.bottom_up
    for d2_name in _bottom_up_state(model):
        module_path, leaf = d2_name.rsplit(".", 1)
        module = bu.get_submodule(module_path)
        if norm == "GN+WS" and leaf == "weight" and not module_path.endswith("norm"):
            value = module.parametrizations.weight.original  # WS convs: the raw weight
        else:
            value = getattr(module, leaf)
        expected = torch.from_numpy(file_tensors[c2_name(d2_name)])
        assert torch.equal(value.detach(), expected), d2_name


_TV = []


def _tv_resnet18_file():
    """A torchvision ResNet-18 with random weights and non-trivial BN statistics (cached)."""
    if not _TV:
        import torchvision

        torch.manual_seed(1)
        tv = torchvision.models.resnet18()
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.data.uniform_(0.5, 2)
                m.bias.data.uniform_(-1, 1)
        _TV.append(tv)
    return _TV[0]


@pytest.mark.parametrize("norm,wrapper", [("GN+WS", "plain"), ("BN", "state_dict+module"), ("GN", "plain")])
def test_torchvision_pth_loads_into_the_backbone(tmp_path, norm, wrapper):
    tv = _tv_resnet18_file()
    sd = tv.state_dict()
    if wrapper == "state_dict+module":  # as saved by DataParallel classification code
        sd = {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 90}
    path = str(tmp_path / "resnet18.pth")
    torch.save(sd, path)
    model = _model(norm)

    report = load_pretrained_backbone(model, path)

    n_convs = len(convs_with_norm(model.backbone.bottom_up))  # each with one torchvision conv + BN
    pairs = torchvision_module_pairs(tv, model.backbone.bottom_up)
    assert len(pairs) == 2 * n_convs > 0
    for tv_m, d2_m in pairs:
        if isinstance(tv_m, nn.Conv2d):
            w = d2_m.parametrizations.weight.original if norm == "GN+WS" else d2_m.weight
            assert torch.equal(w.detach(), tv_m.weight.detach())
        else:
            assert torch.equal(d2_m.weight.detach(), tv_m.weight.detach())
            assert torch.equal(d2_m.bias.detach(), tv_m.bias.detach())
            if norm == "BN":
                assert torch.equal(d2_m.running_mean, tv_m.running_mean)
                assert torch.equal(d2_m.running_var, tv_m.running_var)
    if norm == "BN":  # every bottom-up tensor but the counters (num_batches_tracked, one per BN)
        n_bottom_up = sum(1 for k in model.state_dict() if k.startswith("backbone.bottom_up."))
        n_expected = n_bottom_up - n_convs
    else:  # conv weight, norm weight and bias
        n_expected = 3 * n_convs
    assert len(report.backbone_loaded) == n_expected
    if norm != "BN":  # BN statistics have no place in a GN model: reported as unused
        assert "stem.conv1.norm.running_mean" in report.unused
    assert not any(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in report.unused)


def test_convert_torchvision_resnet50_names():
    import torchvision

    with torch.device("meta"):
        keys = set(torchvision.models.resnet50().state_dict())
    out = convert_torchvision_resnet(dict.fromkeys(keys, 0))
    for tv_key, d2_key in [
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer1.0.conv3.weight", "res2.0.conv3.weight"),
        ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
        ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
        ("layer3.5.bn2.weight", "res4.5.conv2.norm.weight"),
        ("layer4.0.downsample.1.running_mean", "res5.0.shortcut.norm.running_mean"),
    ]:
        assert tv_key in keys and d2_key in out
    assert not any(k.startswith(("fc.", "layer")) or "bn" in k or "downsample" in k for k in out)
    assert not any(k.endswith("num_batches_tracked") for k in out)


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def gn_model():
    return _model("GN+WS")


def test_file_matching_nothing_is_refused(tmp_path, gn_model):
    path = str(tmp_path / "other.pth")
    torch.save({"encoder.layers.0.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(CheckpointError) as e:
        D2NormCheckpointer(gn_model).load(path, checkpointables=[])
    msg = str(e.value)
    assert path in msg and "encoder.layers.0.weight" in msg and "MODEL.WEIGHTS" in msg


def test_wrong_backbone_shapes_are_refused(tmp_path, gn_model):
    sd = _tv_resnet18_file().state_dict()
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)  # a 1x1 where the model has 3x3
    path = str(tmp_path / "bad_shape.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        D2NormCheckpointer(gn_model).load(path, checkpointables=[])
    msg = str(e.value)
    assert path in msg and "res3.0.conv1.weight" in msg
    assert "(128, 64, 1, 1)" in msg and "(128, 64, 3, 3)" in msg and "MODEL.RESNETS" in msg


def test_missing_backbone_stage_is_refused_unless_allowed(tmp_path, gn_model):
    sd = {k: v for k, v in _tv_resnet18_file().state_dict().items() if not k.startswith("layer4.")}
    path = str(tmp_path / "no_layer4.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        D2NormCheckpointer(gn_model).load(path, checkpointables=[])
    msg = str(e.value)
    assert path in msg and "backbone.bottom_up.res5.0.conv1.weight" in msg
    assert "strict_backbone" in msg
    report = load_pretrained_backbone(gn_model, path, strict_backbone=False)
    assert report.backbone_loaded and not any(".res5." in k for k in report.backbone_loaded)


def test_own_checkpoints_keep_detectron2_rules_for_heads(tmp_path, gn_model):
    """A predictor for another class count is skipped with a warning (fine-tuning); a backbone
    tensor of the wrong shape is refused."""
    sd = {k: v.clone() for k, v in gn_model.state_dict().items()}
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(11, 256)
    sd["roi_heads.box_predictor.cls_score.bias"] = torch.zeros(11)
    sd["backbone.bottom_up.stem.conv1.norm.weight"] = torch.full((64,), 3.0)
    path = str(tmp_path / "model_other_classes.pth")
    torch.save({"model": sd, "iteration": 5}, path)
    D2NormCheckpointer(gn_model).load(path, checkpointables=[])
    assert torch.equal(gn_model.backbone.bottom_up.stem.conv1.norm.weight, torch.full((64,), 3.0))
    assert gn_model.roi_heads.box_predictor.cls_score.weight.shape[0] == 4  # 3 classes + bg

    key = "backbone.bottom_up.res2.0.conv1.parametrizations.weight.original"
    sd[key] = torch.zeros(64, 64, 1, 1)
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as e:
        D2NormCheckpointer(gn_model).load(path, checkpointables=[])
    assert key in str(e.value) and path in str(e.value)
