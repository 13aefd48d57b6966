"""The norm table: options travel with the call (no module state), and the capability flags
describe what the layers do."""

import copy
import pickle

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn

import d2norm
from d2norm import norms
from d2norm.layers import ConvFedNorm

# Options set by the tests, as (cfg key, value); two configs that differ in every one of them.
OPTIONS_A = {
    "D2NORM.CBN.BUFFER_SIZE": 2,
    "D2NORM.CBN.BURNIN_ITERS": 5,
    "D2NORM.CBN.EPS": 1e-4,
    "D2NORM.GN.NUM_GROUPS": 16,
    "D2NORM.WS.EPS": 1e-6,
    "D2NORM.WS.CONVENTION": "std_plus_eps",
    "D2NORM.MABN.BUFFER_SIZE": 3,
    "D2NORM.MABN.WARMUP_ITERS": 7,
    "D2NORM.EVONORM.NUM_GROUPS": 8,
}
OPTIONS_B = {
    "D2NORM.CBN.BUFFER_SIZE": 5,
    "D2NORM.CBN.BURNIN_ITERS": 0,
    "D2NORM.CBN.EPS": 1e-3,
    "D2NORM.GN.NUM_GROUPS": 8,
    "D2NORM.WS.EPS": 1e-4,
    "D2NORM.WS.CONVENTION": "sqrt_var",
    "D2NORM.MABN.BUFFER_SIZE": 6,
    "D2NORM.MABN.WARMUP_ITERS": 2,
    "D2NORM.EVONORM.NUM_GROUPS": 4,
}
# (layer class name, attribute) -> cfg key: what each layer must carry
EXPECTED = {
    ("CrossIterationBatchNorm2d", "buffer_size"): "D2NORM.CBN.BUFFER_SIZE",
    ("CrossIterationBatchNorm2d", "burnin"): "D2NORM.CBN.BURNIN_ITERS",
    ("CrossIterationBatchNorm2d", "eps"): "D2NORM.CBN.EPS",
    ("GroupNormWS", "num_groups"): "D2NORM.GN.NUM_GROUPS",
    ("GroupNormWS", "ws_eps"): "D2NORM.WS.EPS",
    ("GroupNormWS", "ws_convention"): "D2NORM.WS.CONVENTION",
    ("MovingAverageBatchNorm2d", "buffer_size"): "D2NORM.MABN.BUFFER_SIZE",
    ("MovingAverageBatchNorm2d", "warmup_iters"): "D2NORM.MABN.WARMUP_ITERS",
    ("EvoNormS0", "num_groups"): "D2NORM.EVONORM.NUM_GROUPS",
}


def _mixed_cfg(options):
    """A synthetic Mask R-CNN with four d2norm norms (one per call site) and ``options``."""
    cfg = synthetic_cfg("CBN")
    cfg.defrost()
    cfg.MODEL.FPN.NORM = "GN+WS"
    cfg.MODEL.ROI_BOX_HEAD.NORM = "MABN"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "EvoNorm-S0"
    cfg.merge_from_list([x for kv in options.items() for x in kv])
    return cfg


def _check_layers(model, options):
    seen = set()
    for path, m in model.named_modules():
        for (cls, attr), key in EXPECTED.items():
            if type(m).__name__ == cls:
                assert getattr(m, attr) == options[key], f"{path}.{attr}: {getattr(m, attr)} != {key}"
                seen.add(cls)
    assert seen == {cls for cls, _ in EXPECTED}


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_two_models_with_different_options_in_one_process(order):
    opts = {"A": OPTIONS_A, "B": OPTIONS_B}
    models = {k: d2norm.build_model(_mixed_cfg(opts[k])) for k in order}
    for k, model in models.items():
        _check_layers(model, opts[k])


def test_two_models_built_interleaved():
    """Parts of two models built alternately (detectron2's own builders on bound configs)."""
    from detectron2.modeling import build_backbone
    from detectron2.modeling.roi_heads import build_roi_heads

    cfg_a, cfg_b = (d2norm.bind_norms(_mixed_cfg(o)) for o in (OPTIONS_A, OPTIONS_B))
    backbone_a = build_backbone(cfg_a)
    backbone_b = build_backbone(cfg_b)
    heads_b = build_roi_heads(cfg_b, backbone_b.output_shape())
    heads_a = build_roi_heads(cfg_a, backbone_a.output_shape())
    _check_layers(nn.ModuleList([backbone_a, heads_a]), OPTIONS_A)
    _check_layers(nn.ModuleList([backbone_b, heads_b]), OPTIONS_B)


def test_detectron2_build_model_gets_the_options_or_a_clear_error():
    from detectron2.modeling import build_model

    cfg = _mixed_cfg(OPTIONS_A)
    _check_layers(d2norm.prepare_model(build_model(d2norm.bind_norms(cfg)), cfg), OPTIONS_A)
    plain = build_model(cfg)  # the names only: the layers take the defaults
    with pytest.raises(
        ValueError, match=r"the config sets D2NORM\.GN\.NUM_GROUPS=16.*Fix: build it with d2norm.build_model"
    ):
        d2norm.prepare_model(plain, cfg)
    # the config is left as it was
    assert type(cfg.MODEL.RESNETS.NORM) is str and not hasattr(cfg.MODEL.RESNETS.NORM, "options")


def test_norm_with_options_is_the_layer_built_with_them():
    from d2norm.layers import CrossIterationBatchNorm2d

    from detectron2.layers import Conv2d, get_norm

    bound = d2norm.norm("CBN", buffer_size=4, burnin=2)
    assert bound == "CBN"  # compares as its name (detectron2 compares NORM with names)
    layer = get_norm(bound, 16)
    ref = CrossIterationBatchNorm2d(16, buffer_size=4, burnin=2)
    assert type(layer) is type(ref) and layer.extra_repr() == ref.extra_repr()
    for other in (copy.deepcopy(bound), pickle.loads(pickle.dumps(bound))):
        assert other.options == {"buffer_size": 4, "burnin": 2} and other == "CBN"
    # through a module that calls get_norm, and prepared without a config
    net = nn.Sequential(Conv2d(3, 16, 3, bias=False, norm=get_norm(bound, 16)))
    d2norm.prepare_model(net)
    assert net[0].norm.bound_conv is net[0] and net[0].norm.buffer_size == 4


def test_norm_refuses_unknown_names_and_options():
    with pytest.raises(
        TypeError, match=r"unknown option\(s\) buffer.*buffer_size \(D2NORM.CBN.BUFFER_SIZE\)"
    ):
        d2norm.norm("CBN", buffer=4)
    with pytest.raises(KeyError, match="Unknown normalization 'CBNN'"):
        d2norm.norm("CBNN")
    with pytest.raises(ValueError, match="D2NORM.CBN.BUFFER_SIZE"):  # the layer's own check
        d2norm.norm("CBN", buffer_size=0)(8)


def test_lazy_config_instantiate_passes_the_options():
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.modeling.backbone.resnet import BasicStem

    stem = instantiate(
        L(BasicStem)(in_channels=3, out_channels=16, norm=L(d2norm.norm)(name="GN", num_groups=4))
    )
    assert stem.conv1.norm.num_groups == 4
    d2norm.prepare_model(stem)
    # the bound norm itself as a LazyConfig value (kept as the object, options included)
    stem = instantiate(L(BasicStem)(in_channels=3, out_channels=16, norm=d2norm.norm("GN", num_groups=2)))
    assert stem.conv1.norm.num_groups == 2
    stem = instantiate(
        L(BasicStem)(in_channels=3, out_channels=16, norm=L(d2norm.norm)(name="GN+WS", num_groups=8))
    )
    d2norm.prepare_model(stem)  # no config: the options are the layers'
    assert stem.conv1.norm.num_groups == 8 and stem.conv1.norm.conv_prepared
    out = stem(torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 16, 4, 4)


# ------------------------------------------------------------------ the flags describe the layers
# non-default values for every option (keyword -> value), to read back from the built layer
_VALUES = {
    "num_groups": 4,
    "eps": 3e-4,
    "ws_eps": 2e-6,
    "ws_convention": "std_plus_eps",
    "buffer_size": 2,
    "burnin": 3,
    "momentum": 0.5,
    "grad_through_compensation": True,
    "warmup_iters": 9,
    "r_max": 2.0,
    "d_max": 1.0,
    "ramp_start": 1,
    "r_max_end": 2,
    "d_max_end": 3,
    "learnable_eps": True,
    "learned_eps_init": 1e-3,
    "replace_relu": False,
}


@pytest.mark.parametrize("name", sorted(norms.NORMS))
def test_each_entry_builds_its_layer_with_its_options(name):
    spec = norms.NORMS[name]
    options = {kw: _VALUES[kw] for kw in spec.options}
    layer = d2norm.build_norm(name, 8, **options)
    assert type(layer) is spec.layer
    assert norms.layer_options(layer) == options  # every option is stored under its keyword
    assert set(spec.defaults()) == set(spec.options)


@pytest.mark.parametrize("name", sorted(norms.NORMS))
def test_capability_flags_match_the_layer(name):
    spec = norms.NORMS[name]
    layer = d2norm.build_norm(name, 8)
    assert spec.needs_conv == isinstance(layer, ConvFedNorm)
    assert spec.activation == hasattr(layer, "drop_activation")
    assert not (spec.per_sample and spec.foldable)
    for buf in spec.history + spec.history_counters:
        assert buf in dict(layer.named_buffers()), buf
    if spec.running_stats:  # training advances state
        conv = nn.Conv2d(3, 8, 3, bias=False)
        if spec.needs_conv:
            layer.prepare_preceding_conv(conv)
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.train()(conv(torch.randn(2, 3, 6, 6)))
        assert any(not torch.equal(before[k], v) for k, v in layer.state_dict().items())
    if spec.foldable:  # the eval map is the per-channel affine of eval_statistics
        with torch.no_grad():
            for p in layer.parameters():
                p.uniform_(0.5, 1.5)
            for key in ("running_mean", "running_var", "running_std"):
                if getattr(layer, key, None) is not None:
                    getattr(layer, key).uniform_(0.5, 1.5)
        layer.eval()
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
        scale, shift = norms.eval_statistics(layer).scale_shift()
        ref = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        torch.testing.assert_close(layer(x.float()).double(), ref, atol=1e-5, rtol=1e-5)
    else:
        assert spec.frozen is None
    if spec.frozen is not None:
        layer.eval()
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(spec.frozen(layer)(x), layer(x))


def test_what_is_a_norm_is_the_table():
    types = norms.norm_layer_types()
    assert all(spec.layer in types for spec in norms.NORMS.values())
    assert norms.is_norm_layer(nn.BatchNorm2d(4)) and not norms.is_norm_layer(nn.Conv2d(3, 4, 1))
