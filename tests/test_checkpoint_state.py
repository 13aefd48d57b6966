"""Norm method state through the real checkpointer path (D2NormCheckpointer.load, the Trainer's
resume_or_load): converted before fvcore's shape check, restarted with a warning when it does not
fit, refused with the right reason otherwise; detectron2-main checkpointer conventions."""

import logging
import os

import pytest
import torch
from helpers import synthetic_cfg

import d2norm
from d2norm.checkpoint import CheckpointError, D2NormCheckpointer


def _model(norm, **overrides):
    torch.manual_seed(0)
    return d2norm.build_model(synthetic_cfg(norm, **overrides))


def _norm_layers(model, cls_name):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == cls_name}


def _official_mabn_file(tmp_path):
    """A MABN model's state in the official MABN2d layout: running_var (1, C, 1, 1), iters (1,),
    with distinct values so that a wrong mapping shows."""
    src = _model("MABN")
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    layers = _norm_layers(src, "MovingAverageBatchNorm2d")
    assert layers
    for name in layers:
        rv = sd[f"{name}.running_var"]
        sd[f"{name}.running_var"] = (torch.rand(rv.shape, generator=g) + 0.5).reshape(1, -1, 1, 1)
        sd[f"{name}.weight"] = torch.rand(rv.shape, generator=g) + 0.5
        sd[f"{name}.iters"] = torch.tensor([5000])
        sd[f"{name}.buffer_x2"] = torch.rand(sd[f"{name}.buffer_x2"].shape, generator=g)
    path = str(tmp_path / "mabn_official.pth")
    torch.save({"model": sd}, path)
    return path, sd, list(layers)


def test_official_layout_mabn_weights_load(tmp_path):
    path, sd, names = _official_mabn_file(tmp_path)
    model = _model("MABN")
    D2NormCheckpointer(model).load(path, checkpointables=[])
    report = D2NormCheckpointer.last_load_report  # class default untouched
    assert report is None
    for name in names:
        layer = model.get_submodule(name)
        assert torch.equal(layer.running_var, sd[f"{name}.running_var"].reshape(-1))
        assert torch.equal(layer.weight.detach(), sd[f"{name}.weight"])
        assert layer.iters.shape == () and int(layer.iters) == 5000
        assert torch.equal(layer.buffer_x2, sd[f"{name}.buffer_x2"])


def test_official_layout_mabn_weights_load_into_frozen_stages(tmp_path):
    """FREEZE_AT turns the stem's and res2's MABN into FrozenBatchNorm2d: they take the file's
    (1, C, 1, 1) running_var and γ, β, and compute MABN's eval map (no mean)."""
    from detectron2.layers import FrozenBatchNorm2d

    path, sd, _ = _official_mabn_file(tmp_path)
    model = _model("MABN", **{"MODEL.BACKBONE.FREEZE_AT": 2})
    checkpointer = D2NormCheckpointer(model)
    checkpointer.load(path, checkpointables=[])
    stem = model.backbone.bottom_up.stem.conv1.norm
    assert isinstance(stem, FrozenBatchNorm2d)
    key = "backbone.bottom_up.stem.conv1.norm"
    assert torch.equal(stem.running_var, sd[f"{key}.running_var"].reshape(-1))
    assert torch.equal(stem.weight, sd[f"{key}.weight"])
    assert torch.equal(stem.running_mean, torch.zeros_like(stem.running_mean))
    assert any("reshaped running_var" in note for note in checkpointer.last_load_report.adapted)


def test_mabn_ring_of_another_buffer_size_restarts_with_a_warning(tmp_path, caplog):
    path, sd, names = _official_mabn_file(tmp_path)  # BUFFER_SIZE 16 (the default)
    model = _model("MABN", **{"D2NORM.MABN.BUFFER_SIZE": 4})
    with caplog.at_level(logging.WARNING):
        D2NormCheckpointer(model).load(path, checkpointables=[])
    assert "BUFFER_SIZE=4" in caplog.text and "restart" in caplog.text
    for name in names:
        layer = model.get_submodule(name)
        assert int(layer.iters) == 0  # counts again: batch statistics until the ring is full
        assert layer.buffer_x2.shape == (4, layer.num_features)
        assert torch.equal(layer.running_var, sd[f"{name}.running_var"].reshape(-1))
        assert torch.equal(layer.weight.detach(), sd[f"{name}.weight"])


def _cbn_file(tmp_path, buffer_size=3):
    """A CBN model's checkpoint whose history is full (count k-1) with distinct values."""
    src = _model("CBN", **{"D2NORM.CBN.BUFFER_SIZE": buffer_size})
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    names = list(_norm_layers(src, "CrossIterationBatchNorm2d"))
    for name in names:
        for leaf in ("hist_grad_sqmean", "hist_grad_mean", "hist_sqmean"):
            sd[f"{name}.{leaf}"] = torch.rand(sd[f"{name}.{leaf}"].shape, generator=g)
        sd[f"{name}.hist_count"] = torch.tensor(buffer_size - 1)
        sd[f"{name}.hist_pos"] = torch.tensor(1)
        sd[f"{name}.num_iterations"] = torch.tensor(77)
        sd[f"{name}.running_mean"] = torch.rand(sd[f"{name}.running_mean"].shape, generator=g)
    path = str(tmp_path / f"cbn_k{buffer_size}.pth")
    # written without optimizer state, as detectron2 v0.6's own DefaultTrainer does
    torch.save({"model": sd, "trainer": {"iteration": 76}, "iteration": 76}, path)
    return path, sd, names


def test_cbn_history_of_the_same_size_continues(tmp_path):
    path, sd, names = _cbn_file(tmp_path)
    model = _model("CBN")
    D2NormCheckpointer(model).load(path, checkpointables=[])
    for name in names:
        layer = model.get_submodule(name)
        assert torch.equal(layer.hist_grad_sqmean, sd[f"{name}.hist_grad_sqmean"])
        assert int(layer.hist_count) == 2 and int(layer.hist_pos) == 1 and layer.iteration == 77


def test_cbn_history_of_another_buffer_size_restarts_with_a_warning(tmp_path, caplog):
    """Was: 'the file is for another backbone' (false). Now: loaded, the window restarts."""
    path, sd, names = _cbn_file(tmp_path, buffer_size=3)
    model = _model("CBN", **{"D2NORM.CBN.BUFFER_SIZE": 4})
    with caplog.at_level(logging.WARNING):
        D2NormCheckpointer(model).load(path, checkpointables=[])
    assert "D2NORM.CBN.BUFFER_SIZE=4" in caplog.text and "restarts" in caplog.text
    for name in names:
        layer = model.get_submodule(name)
        assert int(layer.hist_count) == 0 and int(layer.hist_pos) == 0
        assert layer.hist_grad_sqmean.shape[0] == 3  # this layer's own (k - 1) slots
        assert layer.iteration == 77  # burn-in progress is kept
        assert torch.equal(layer.running_mean, sd[f"{name}.running_mean"])
    # and the model trains from there: the next forward is plain BN over the batch
    layer = model.get_submodule(names[0])
    conv = layer.bound_conv  # detectron2's Conv2d: conv, then this norm (no activation here)
    assert conv.activation is None
    x = torch.randn(2, conv.in_channels, 8, 8)
    with torch.no_grad():
        pre = torch.nn.functional.conv2d(
            x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        ref = torch.nn.functional.batch_norm(pre, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        torch.testing.assert_close(conv(x), ref, rtol=1e-4, atol=1e-5)


def test_other_channel_counts_are_still_refused_as_another_backbone(tmp_path):
    path, sd, names = _cbn_file(tmp_path)
    model = _model("CBN", **{"MODEL.RESNETS.STEM_OUT_CHANNELS": 32})
    with pytest.raises(CheckpointError, match="another backbone"):
        D2NormCheckpointer(model).load(path, checkpointables=[])


def test_resume_or_load_converts_through_the_trainer(tmp_path, data_root, caplog):
    """The --resume path: last_checkpoint -> a CBN k=3 checkpoint, trainer built with k=4."""
    from d2norm.engine import Trainer

    path, sd, names = _cbn_file(tmp_path, buffer_size=3)
    with open(os.path.join(tmp_path, "last_checkpoint"), "w") as f:
        f.write(os.path.basename(path))
    cfg = synthetic_cfg(
        "CBN",
        **{
            "D2NORM.DATA.ROOT": data_root,
            "OUTPUT_DIR": str(tmp_path),
            "D2NORM.CBN.BUFFER_SIZE": 4,
            "DATASETS.TEST": (),
        },
    )
    trainer = Trainer(cfg)
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=True)
    assert "restarts" in caplog.text and "no optimizer state" in caplog.text
    assert trainer.start_iter == 77
    layer = trainer.model.get_submodule(names[0])
    assert int(layer.hist_count) == 0 and layer.iteration == 77


# ----------------------------------------------------------------------------- detectron2 main
def test_matching_heuristics_suffix(tmp_path):
    """``?matching_heuristics=True``: names are matched by suffix (here: a backbone-only file)."""
    src = _model("GN")
    bottom_up = {
        k[len("backbone.bottom_up.") :]: v
        for k, v in src.state_dict().items()
        if k.startswith("backbone.bottom_up.")
    }
    path = str(tmp_path / "bottom_up.pth")
    torch.save({"model": bottom_up}, path)
    model = _model("GN")
    with torch.no_grad():
        model.backbone.bottom_up.stem.conv1.norm.weight.fill_(7.0)
    D2NormCheckpointer(model).load(path + "?matching_heuristics=True", checkpointables=[])
    assert torch.equal(
        model.backbone.bottom_up.stem.conv1.norm.weight, src.backbone.bottom_up.stem.conv1.norm.weight
    )
    with pytest.raises(CheckpointError, match="Unsupported query"):
        D2NormCheckpointer(model).load(path + "?strict=1", checkpointables=[])


def test_checkpointer_is_reusable_after_a_failed_load(tmp_path):
    model = _model("GN")
    good = str(tmp_path / "good.pth")
    torch.save({"model": model.state_dict()}, good)
    bad = str(tmp_path / "bad.pth")
    with open(bad, "wb") as f:
        f.write(b"not a checkpoint")
    checkpointer = D2NormCheckpointer(model)
    with pytest.raises(CheckpointError, match="Could not read checkpoint"):
        checkpointer.load(bad, checkpointables=[])
    checkpointer.load(good, checkpointables=[])  # no leftover state from the failure
    assert checkpointer.last_load_report.loaded


def test_torchvision_style_mabn_file_of_another_buffer_size_loads_and_restarts(tmp_path, caplog):
    """A MABN backbone pretrained at a large batch (buffer 1) and written torchvision-style, as
    ``tools/pretrain_backbone.py --variant MABN`` does, fine-tuned with the recipe's buffer 16:
    detectron2's name matching used to drop the (1, C) rings and the load failed as "the file is
    for another backbone". Now: weights and statistics load, the rings restart with a warning."""
    from d2norm.weights import to_torchvision_resnet

    src = _model("MABN", **{"D2NORM.MABN.BUFFER_SIZE": 1})
    names = list(_norm_layers(src.backbone.bottom_up, "MovingAverageBatchNorm2d"))
    sd = {k: v.clone() for k, v in src.backbone.bottom_up.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for name in names:
        sd[f"{name}.running_var"] = torch.rand(sd[f"{name}.running_var"].shape, generator=g) + 0.5
        sd[f"{name}.iters"] = torch.tensor(1500)
    path = str(tmp_path / "mabn_tv.pth")
    torch.save(to_torchvision_resnet(sd), path)

    model = _model("MABN")  # BUFFER_SIZE 16
    with caplog.at_level(logging.WARNING):
        D2NormCheckpointer(model).load(path, checkpointables=[])
    assert "D2NORM.MABN.BUFFER_SIZE=16" in caplog.text and "restarts" in caplog.text
    bottom_up = model.backbone.bottom_up
    for name in names:
        layer = bottom_up.get_submodule(name)
        assert torch.equal(layer.running_var, sd[f"{name}.running_var"])
        assert layer.buffer_x2.shape == (16, layer.num_features) and int(layer.iters) == 0
    raw = bottom_up.res3[0].conv1.parametrizations.weight.original.detach()
    assert torch.equal(raw, sd["res3.0.conv1.parametrizations.weight.original"])
