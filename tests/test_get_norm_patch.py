"""The get_norm patch: every name builds the right module at every call site of a built model."""

import sys

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn

import d2norm
from d2norm import norms, patches
from d2norm.layers import GroupNorm, GroupNormWS, SyncBatchNorm2d

CALL_SITES = (
    "backbone.bottom_up",
    "backbone.fpn_lateral",
    "backbone.fpn_output",
    "roi_heads.box_head",
    "roi_heads.mask_head",
)


def _expected_types():
    from d2norm.layers import CrossIterationBatchNorm2d, MovingAverageBatchNorm2d

    from detectron2.layers import FrozenBatchNorm2d

    return {
        "BN*": FrozenBatchNorm2d,
        "FrozenBN": FrozenBatchNorm2d,
        "SyncBN": SyncBatchNorm2d,
        "GN": GroupNorm,
        "GN+WS": GroupNormWS,
        "CBN": CrossIterationBatchNorm2d,
        "MABN": MovingAverageBatchNorm2d,
        "BN": nn.BatchNorm2d,
    }


def _normed_convs(model):
    from detectron2.layers import Conv2d

    return {n: m for n, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}


@pytest.mark.parametrize("name", ["BN*", "FrozenBN", "SyncBN", "GN", "GN+WS", "CBN", "MABN", "BN"])
def test_every_call_site_gets_the_named_norm(name):
    expected = _expected_types()[name]
    cfg = synthetic_cfg(name)
    model = d2norm.build_model(cfg)
    convs = _normed_convs(model)
    seen = set()
    for conv_name, conv in convs.items():
        assert type(conv.norm) is expected or (name == "BN" and isinstance(conv.norm, nn.BatchNorm2d)), (
            f"{conv_name}: {type(conv.norm).__name__} is not {expected.__name__}"
        )
        for site in CALL_SITES:
            if conv_name.startswith(site):
                seen.add(site)
    assert seen == set(CALL_SITES), f"call sites without a norm: {set(CALL_SITES) - seen}"
    # nothing normalized by another type anywhere in the model
    other = [
        n
        for n, m in model.named_modules()
        if isinstance(m, norms.norm_layer_types()) and not isinstance(m, expected)
    ]
    assert other == []


def test_patch_is_idempotent_and_covers_all_loaded_modules():
    patches.unpatch_get_norm()  # back to detectron2's own get_norm, so the next call patches
    try:
        first = d2norm.patch_get_norm()
    finally:
        d2norm.patch_get_norm()
    assert {
        "detectron2.layers",
        "detectron2.layers.batch_norm",
        "detectron2.modeling.backbone.resnet",
        "detectron2.modeling.backbone.fpn",
        "detectron2.modeling.roi_heads.box_head",
        "detectron2.modeling.roi_heads.mask_head",
    } <= set(first)
    again = d2norm.patch_get_norm()
    assert again == []  # nothing left to patch
    import detectron2.layers
    import detectron2.layers.batch_norm
    import detectron2.modeling.backbone.fpn
    import detectron2.modeling.backbone.resnet
    import detectron2.modeling.roi_heads.box_head
    import detectron2.modeling.roi_heads.mask_head

    for mod in (
        detectron2.layers,
        detectron2.layers.batch_norm,
        detectron2.modeling.backbone.resnet,
        detectron2.modeling.backbone.fpn,
        detectron2.modeling.roi_heads.box_head,
        detectron2.modeling.roi_heads.mask_head,
    ):
        assert mod.get_norm is norms.get_norm
    # no module still refers to the original
    original = norms.detectron2_get_norm
    assert not [
        n
        for n, m in sys.modules.items()
        if n.startswith("detectron2") and m is not None and m.__dict__.get("get_norm") is original
    ]


def test_detectron2_names_and_callables_pass_through():
    from detectron2.layers import get_norm

    assert get_norm("", 8) is None
    assert get_norm(None, 8) is None
    assert isinstance(get_norm("BN", 8), nn.BatchNorm2d)
    m = get_norm(lambda c: nn.GroupNorm(2, c), 8)
    assert isinstance(m, nn.GroupNorm) and m.num_groups == 2


def test_unknown_name_is_a_clear_error():
    from detectron2.layers import get_norm

    with pytest.raises(ValueError) as e:
        get_norm("GroupNorm", 64)
    msg = str(e.value)
    assert "'GroupNorm'" in msg and "'GN+WS'" in msg and "'CBN'" in msg and "MODEL.RESNETS.NORM" in msg
    with pytest.raises(ValueError, match="Valid names"):
        d2norm.build_model(synthetic_cfg("Batchnorm"))


def test_gn_groups_from_config_and_clear_error():
    cfg = synthetic_cfg("GN")
    cfg.D2NORM.GN.NUM_GROUPS = 16
    model = d2norm.build_model(cfg)
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 16 for m in gns)
    cfg.D2NORM.GN.NUM_GROUPS = 48  # does not divide 64
    with pytest.raises(ValueError, match="D2NORM.GN.NUM_GROUPS=48 does not divide"):
        d2norm.build_model(cfg)


def test_options_do_not_leak_outside_the_build():
    cfg = synthetic_cfg("GN")
    cfg.D2NORM.GN.NUM_GROUPS = 16
    d2norm.build_model(cfg)
    assert d2norm.build_norm("GN", 64).num_groups == 32
    assert norms.get_norm("GN", 64).num_groups == 32
    assert cfg.MODEL.RESNETS.NORM == "GN" and type(cfg.MODEL.RESNETS.NORM) is str  # cfg unchanged


@pytest.mark.parametrize("name", ["CBN", "MABN", "BRN"])
def test_frozen_stages_use_the_eval_map_of_cbn_mabn_brn(name):
    """FREEZE_AT stages: a CBN / MABN / BRN layer becomes the FrozenBatchNorm2d of its eval map."""
    from d2norm.norms import frozen_batch_norm_of

    from detectron2.layers import FrozenBatchNorm2d

    cfg = synthetic_cfg(name)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem and res2
    model = d2norm.build_model(cfg)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up.stem.conv1.norm, FrozenBatchNorm2d)
    assert all(isinstance(b.conv1.norm, FrozenBatchNorm2d) for b in bottom_up.res2)
    layer_type = type(bottom_up.res3[0].conv1.norm)
    assert layer_type.__name__ in ("CrossIterationBatchNorm2d", "MovingAverageBatchNorm2d", "BatchRenorm2d")
    # the replacement computes the layer's own eval map
    torch.manual_seed(0)
    layer = layer_type(8) if name == "BRN" else layer_type(8, buffer_size=2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.uniform_(-1, 1)
        if name == "BRN":
            layer.running_std.uniform_(0.5, 3)
        else:
            layer.running_var.uniform_(0.5, 3)
        if hasattr(layer, "running_mean"):
            layer.running_mean.uniform_(-1, 1)
    layer.eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(frozen_batch_norm_of(layer)(x), layer(x))


def test_keyerror_inside_a_callable_propagates_unchanged():
    """A KeyError raised while a user's callable builds its layer is that callable's error, not an
    unknown normalization name."""
    from detectron2.layers import get_norm

    def my_norm(c):
        return {"GN": nn.GroupNorm}["gn"](4, c)  # the user's own bug

    with pytest.raises(KeyError) as e:
        get_norm(my_norm, 8)
    assert e.value.args == ("gn",) and "Unknown normalization" not in str(e.value)


def test_unknown_name_is_a_keyerror_as_in_detectron2():
    from detectron2.layers import get_norm

    with pytest.raises(KeyError, match="Unknown normalization 'GroupNorm'"):
        get_norm("GroupNorm", 64)


def test_valid_names_are_those_the_installed_detectron2_accepts():
    """'LN' is listed only where detectron2's own get_norm builds it (main does, v0.6 does not)."""
    from detectron2.layers import get_norm

    try:
        norms.detectron2_get_norm("LN", 8)
        has_ln = True
    except KeyError:
        has_ln = False
    if has_ln:
        assert get_norm("LN", 8) is not None
    else:
        with pytest.raises(ValueError) as e:
            get_norm("LN", 8)
        assert "'LN'" not in str(e.value).split("Valid names:")[1]


def test_option_defaults_are_those_of_add_d2norm_config():
    """One source for the defaults: what a norm built without a config uses is what
    add_d2norm_config puts in a config (every option of every method)."""
    from detectron2.config import get_cfg

    cfg = d2norm.add_d2norm_config(get_cfg())
    gn, ws = d2norm.build_norm("GN+WS", 64), cfg.D2NORM.WS
    assert (gn.num_groups, gn.eps) == (cfg.D2NORM.GN.NUM_GROUPS, cfg.D2NORM.GN.EPS)
    assert (gn.ws_eps, gn.ws_convention) == (ws.EPS, ws.CONVENTION)
    mabn = d2norm.build_norm("MABN", 8)
    mabn_cfg = cfg.D2NORM.MABN
    assert (mabn.buffer_size, mabn.warmup_iters) == (mabn_cfg.BUFFER_SIZE, mabn_cfg.WARMUP_ITERS)


@pytest.mark.parametrize("name", ["GN+WS", "BN+WS", "MABN"])
def test_layers_built_by_name_refuse_to_train_before_their_conv_is_prepared(name):
    from detectron2.layers import get_norm

    conv, norm = nn.Conv2d(3, 32, 3, bias=False), get_norm(name, 32)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"never prepared.*d2norm\.build_model.*prepare_preceding_conv"):
        norm(conv(x))
    norm.prepare_preceding_conv(conv)
    norm(conv(x))
