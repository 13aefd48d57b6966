"""d2norm's messages and the model printout reach ``log.txt`` through detectron2's logger setup."""

import logging

import pytest
import torch
from helpers import tiny_train_argv

pytestmark = pytest.mark.slow  # a short training run


class _NaNAt:
    """The trainer's batches, with a NaN patch in the first image of batch ``at``."""

    def __init__(self, it, at):
        self.it, self.at, self.calls = it, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        if self.calls == self.at:
            batch = [dict(d) for d in batch]
            batch[0]["image"] = batch[0]["image"].float().index_fill(1, torch.arange(10, 40), float("nan"))
        self.calls += 1
        return batch


def test_d2norm_messages_and_model_go_to_log_txt(tmp_path, data_root):
    from d2norm.engine import Trainer
    from d2norm.engine.cbn_regime import cbn_regime_warning
    from d2norm.engine.launch import parse_args, setup

    args = parse_args(
        tiny_train_argv(
            "mask_rcnn_R_18_FPN_CBN.yaml",
            tmp_path,
            data_root,
            "INPUT.MIN_SIZE_TRAIN",
            "(96,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "3",
            # CBN in the RoI heads of a model trained from scratch: the regime warning
            "MODEL.ROI_BOX_HEAD.NORM",
            "CBN",
            "MODEL.ROI_MASK_HEAD.NORM",
            "CBN",
        )
    )
    try:
        cfg = setup(args)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        nan = _NaNAt(iter(trainer._trainer._data_loader_iter), at=1)
        if "_data_loader_iter_obj" in vars(trainer._trainer):  # detectron2 after v0.6: a property
            trainer._trainer._data_loader_iter_obj = nan
        else:
            trainer._trainer._data_loader_iter = nan
        trainer.train()
    finally:  # detectron2's setup_logger stops propagation; other tests read records via the root
        logging.getLogger("d2norm").propagate = True
    with open(tmp_path / "log.txt") as f:
        log = f.read()
    warning = cbn_regime_warning(cfg)
    assert warning and warning in log  # the CBN regime warning
    assert "Iteration 1: skipped a non-finite training step" in log  # the guard
    # the model printout, as detectron2's trainer logs it, with d2norm's layers in it
    assert "d2norm.engine.trainer INFO: Model:\nGeneralizedRCNN(" in log
    n_cbn = sum(type(m).__name__ == "CrossIterationBatchNorm2d" for m in trainer.model.modules())
    assert n_cbn > 0 and log.count("CrossIterationBatchNorm2d(") == n_cbn
    assert "] d2norm WARNING: Iteration 1: skipped" in log  # through the "d2norm" logger
