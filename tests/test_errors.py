"""Every bad input gives an error that names the problem (config key / file) and the fix, raised
from d2norm code (not deep inside torch / detectron2), end to end through train_net's main."""

import os
import traceback

import pytest
import torch
from helpers import REPO, synthetic_cfg, tiny_train_argv

import d2norm  # noqa: F401  (before detectron2: the _C stand-in)

D2NORM_DIR = os.path.join(REPO, "d2norm")


def _args(out, data_root, *opts, config="mask_rcnn_R_18_FPN_GN.yaml", eval_only=False, resume=False):
    from d2norm.engine.launch import parse_args

    argv = ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += tiny_train_argv(config, out, data_root, "SOLVER.MAX_ITER", "1", *opts)
    return parse_args(argv)


def _raise_from_main(args, exc_type):
    from d2norm.engine.launch import main

    with pytest.raises(exc_type) as info:
        main(args)
    return info


def _check(info, *fragments):
    """The message holds every fragment, and the error is raised by d2norm's own code."""
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    innermost = traceback.extract_tb(info.tb)[-1].filename
    assert os.path.abspath(innermost).startswith(D2NORM_DIR), f"raised in {innermost}: {message}"
    assert len(message) < 1200, message  # one readable paragraph, not a dump


def test_unknown_norm_name(tmp_path, data_root):
    info = _raise_from_main(_args(tmp_path, data_root, "MODEL.FPN.NORM", "GroupNorm"), ValueError)
    _check(
        info,
        "Unknown normalization 'GroupNorm'",
        "MODEL.FPN.NORM",
        "Valid names",
        "'GN+WS'",
        "'CBN'",
        "'MABN'",
        "Fix",
    )


@pytest.mark.parametrize(
    "groups,fragments",
    [
        ("48", ("D2NORM.GN.NUM_GROUPS=48 does not divide the 64 channels", "Fix")),
        ("0", ("D2NORM.GN.NUM_GROUPS must be a positive integer, got 0", "Fix")),
    ],
)
def test_group_norm_groups(tmp_path, data_root, groups, fragments):
    info = _raise_from_main(_args(tmp_path, data_root, "D2NORM.GN.NUM_GROUPS", groups), ValueError)
    _check(info, *fragments)


def test_group_norm_groups_with_gn_ws(tmp_path, data_root):
    info = _raise_from_main(
        _args(tmp_path, data_root, "D2NORM.GN.NUM_GROUPS", "24", config="mask_rcnn_R_18_FPN_GN_WS.yaml"),
        ValueError,
    )
    _check(info, "D2NORM.GN.NUM_GROUPS=24 does not divide")


def test_cbn_buffer_below_one(tmp_path, data_root):
    info = _raise_from_main(
        _args(tmp_path, data_root, "D2NORM.CBN.BUFFER_SIZE", "0", config="mask_rcnn_R_18_FPN_CBN.yaml"),
        ValueError,
    )
    _check(info, "D2NORM.CBN.BUFFER_SIZE", "integer >= 1, got 0")


def test_mabn_buffer_below_one(tmp_path, data_root):
    info = _raise_from_main(
        _args(tmp_path, data_root, "D2NORM.MABN.BUFFER_SIZE", "0", config="mask_rcnn_R_18_FPN_MABN.yaml"),
        ValueError,
    )
    _check(info, "D2NORM.MABN.BUFFER_SIZE", "integer >= 1, got 0")


def test_cbn_unbound():
    """A CBN model built without d2norm's preparation pass (detectron2's own build_model)."""
    from detectron2.modeling import build_model as d2_build_model
    from detectron2.structures import Boxes, Instances

    cfg = synthetic_cfg("CBN")
    model = d2_build_model(d2norm.bind_norms(cfg))
    model.train()
    inst = Instances(
        (96, 96), gt_boxes=Boxes(torch.tensor([[10.0, 10, 40, 40]])), gt_classes=torch.tensor([1])
    )
    with pytest.raises(RuntimeError) as info:
        model([{"image": torch.zeros(3, 96, 96), "instances": inst}])
    _check(info, "is not bound", "d2norm.prepare_model(model)", "d2norm.build_model")


@pytest.mark.parametrize("eval_only", [False, True])
def test_missing_weights_file(tmp_path, data_root, eval_only):
    from d2norm.checkpoint import CheckpointError

    missing = str(tmp_path / "nope" / "model_final.pth")
    info = _raise_from_main(
        _args(tmp_path / "out", data_root, "MODEL.WEIGHTS", missing, eval_only=eval_only), CheckpointError
    )
    _check(info, "Weights file not found", missing, "MODEL.WEIGHTS", "Fix")


def test_corrupt_weights_file(tmp_path, data_root):
    from d2norm.checkpoint import CheckpointError

    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"\x80\x02not a checkpoint" * 50)
    info = _raise_from_main(
        _args(tmp_path / "out", data_root, "MODEL.WEIGHTS", str(bad), eval_only=True), CheckpointError
    )
    _check(info, "Could not read checkpoint", str(bad), "corrupt", "Fix")
    assert "weights_only" not in str(info.value)  # torch's advice would mislead here


def test_truncated_last_checkpoint_on_resume(tmp_path, data_root):
    from d2norm.checkpoint import CheckpointError

    out = tmp_path / "out"
    out.mkdir()
    full = tmp_path / "full.pth"
    torch.save({"model": {"w": torch.randn(1000)}, "iteration": 3}, full)
    (out / "model_0000003.pth").write_bytes(full.read_bytes()[:2000])
    (out / "model_0000001.pth").write_bytes(full.read_bytes()[:1000])
    (out / "last_checkpoint").write_text("model_0000003.pth")
    # every checkpoint is unreadable (the fallback to a readable one: test_checkpoint_atomic.py)
    info = _raise_from_main(_args(out, data_root, resume=True), CheckpointError)
    _check(info, "no readable checkpoint", "model_0000003.pth", "model_0000001.pth", "last_checkpoint", "Fix")


def test_data_root_not_writable(tmp_path, data_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    root = str(blocker / "datasets")
    info = _raise_from_main(_args(tmp_path / "out", data_root, "D2NORM.DATA.ROOT", root), OSError)
    _check(info, "D2NORM.DATA.ROOT", root, "writable")


@pytest.fixture
def missing_json_dataset(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    name = "d2norm_test_missing_json"
    json_file = str(tmp_path / "gone" / "annotations.json")
    register_coco_instances(name, {}, json_file, str(tmp_path))
    yield name, json_file
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_registered_dataset_without_its_json(tmp_path, data_root, missing_json_dataset):
    name, json_file = missing_json_dataset
    info = _raise_from_main(
        _args(tmp_path / "out", data_root, "DATASETS.TRAIN", f"('{name}',)"), FileNotFoundError
    )
    _check(info, name, "DATASETS.TRAIN", json_file, "Fix")


def test_unregistered_dataset(tmp_path, data_root):
    info = _raise_from_main(
        _args(
            tmp_path / "out",
            data_root,
            "DATASETS.TEST",
            "('no_such_set',)",
            "MODEL.WEIGHTS",
            "",
            eval_only=True,
        ),
        ValueError,
    )
    _check(info, "'no_such_set'", "DATASETS.TEST", "not registered", "d2norm_shapes_train")


def test_config_file_and_key(tmp_path, data_root):
    from d2norm.engine.launch import main, parse_args

    with pytest.raises(SystemExit) as info:
        main(parse_args(["--config-file", str(tmp_path / "missing.yaml")]))
    _check(info, "Config file not found", "missing.yaml", "Fix")
    info = _raise_from_main(_args(tmp_path, data_root, "D2NORM.CBN.BUFER_SIZE", "3"), SystemExit)
    _check(info, "D2NORM.CBN.BUFER_SIZE", "Fix")
