"""train_net end to end on the tiny synthetic split, and exact --resume."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_train_argv

pytestmark = pytest.mark.slow  # training runs end to end


def _train_net_args(out, data_root, *extra, eval_only=False, resume=False):
    from d2norm.engine.launch import parse_args

    argv = ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += tiny_train_argv(
        "mask_rcnn_R_18_FPN_GN.yaml",
        out,
        data_root,
        "INPUT.MIN_SIZE_TRAIN",
        "(96,)",
        "INPUT.MAX_SIZE_TRAIN",
        "96",
        "INPUT.MIN_SIZE_TEST",
        "96",
        "INPUT.MAX_SIZE_TEST",
        "96",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.WARMUP_ITERS",
        "2",
        *extra,
        test="('d2norm_shapes_tiny_val',)",
    )
    return parse_args(argv)


# GN recipe, the arguments below, 60 iterations (SEED 42), known-good run: box AP 7.26, mask AP
# 6.25 on d2norm_shapes_tiny_val (an untrained model scores ~0). The floors are about half of
# that, room for other CPUs' float rounding; a run that does not learn stays below them.
E2E_ITERS = 60
E2E_AP_FLOOR = {"bbox": 3.5, "segm": 3.0}


def test_train_then_evaluate(tmp_path, data_root):
    from d2norm.engine.launch import main

    out = tmp_path / "run"
    main(
        _train_net_args(out, data_root, "SOLVER.MAX_ITER", str(E2E_ITERS), "SOLVER.CHECKPOINT_PERIOD", "1000")
    )
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert all(np.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    # the evaluation at the end of training, as logged
    trained = {task: [m[f"{task}/AP"] for m in metrics if f"{task}/AP" in m][-1] for task in E2E_AP_FLOOR}
    res = main(_train_net_args(out, data_root, "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True))
    assert set(res) == {"bbox", "segm"}
    for task, floor in E2E_AP_FLOOR.items():
        assert res[task]["AP"] >= floor, (task, res[task]["AP"])
        # --eval-only on the saved weights reproduces the evaluation at the end of training
        assert abs(res[task]["AP"] - trained[task]) < 1e-6, (task, res[task]["AP"], trained[task])


def _run(cfg, max_iter):
    from d2norm.engine import Trainer

    from detectron2.utils.env import seed_all_rng

    cfg = cfg.clone()
    cfg.SOLVER.MAX_ITER = max_iter
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    trainer.train()
    return {it: v for v, it in trainer.storage.history("total_loss").values()}, trainer


@pytest.mark.parametrize("norm", ["GN", "BN", "CBN", "MABN", "BRN", "BCN+WS"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, data_root, norm):
    from helpers import synthetic_cfg

    cfg = synthetic_cfg(
        norm,
        **{
            "SOLVER.CHECKPOINT_PERIOD": 3,
            "D2NORM.DATA.ROOT": data_root,
            "D2NORM.CBN.BURNIN_ITERS": 1,
            "D2NORM.MABN.WARMUP_ITERS": 2,
            "D2NORM.MABN.BUFFER_SIZE": 2,
            # BRN's ramp runs through the resumed iterations
            "D2NORM.BRN.RAMP_START_ITER": 1,
            "D2NORM.BRN.R_MAX_END_ITER": 5,
            "D2NORM.BRN.D_MAX_END_ITER": 4,
            # BCN's "cumulative" rate max(r, 1/(t+1)) changes through the resumed iterations
            "D2NORM.BCN.MOVING_SPEED": 0.2,
        },
    )
    cfg.OUTPUT_DIR = str(tmp_path / "full")
    full, full_trainer = _run(cfg, 6)
    if norm == "CBN":  # the trainer records the end of burn-in (after iteration 0 here)
        ended = full_trainer.storage.history("cbn_burnin_ended_iter").values()
        assert [v for v, _ in ended] == [0]
    assert sorted(full) == list(range(6))
    # a second run resumes from the checkpoint written after iteration 2
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "model_0000002.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000002.pth")
    cfg.OUTPUT_DIR = str(resumed_dir)
    torch.manual_seed(12345)  # any RNG state: the checkpoint restores it
    resumed, trainer = _run(cfg, 6)
    assert trainer.start_iter == 3
    assert sorted(resumed) == [3, 4, 5]
    for it in (3, 4, 5):
        assert resumed[it] == full[it], f"iteration {it}: {resumed[it]} != {full[it]}"
    # and ends in the same weights and norm state (running statistics, histories, step counters)
    a, b = full_trainer.model.state_dict(), trainer.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if norm == "BRN":
        assert int(trainer.model.backbone.bottom_up.stem.conv1.norm.iters) == 6
    if norm == "BCN+WS":
        assert int(trainer.model.backbone.bottom_up.stem.conv1.norm.bn.num_batches_tracked) == 6
