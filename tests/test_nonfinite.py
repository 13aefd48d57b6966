"""Non-finite batches are skipped and undone: running statistics stay finite, training goes on."""

import copy

import pytest
import torch
from torch import nn

import d2norm  # noqa: I001  (before detectron2: the _C stand-in)
from d2norm.engine.guards import NonFiniteGuard, guarded_run_step
from d2norm.norms import build_norm

from detectron2.engine import SimpleTrainer
from detectron2.layers import Conv2d
from detectron2.utils.events import EventStorage


class _Toy(nn.Module):
    """conv+norm -> conv+norm -> mean; the loss of a batch tensor."""

    def __init__(self, norm, **options):
        super().__init__()
        self.a = Conv2d(
            3, 8, 3, padding=1, bias=False, norm=build_norm(norm, 8, **options), activation=torch.relu
        )
        self.b = Conv2d(8, 8, 3, padding=1, bias=False, norm=build_norm(norm, 8, **options))
        d2norm.prepare_model(self)

    def forward(self, x):
        y = self.b(self.a(x))
        return {"loss_a": (y - 0.3).pow(2).mean(), "loss_b": y.mean().abs()}


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 6, 6, generator=g) * 2 + 1 for _ in range(n)]


def _train(model, batches, max_consecutive=20):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    trainer = SimpleTrainer(model, batches, opt)
    guard = NonFiniteGuard(model, max_consecutive=max_consecutive)
    done = []
    with EventStorage(0) as storage:
        for it in range(len(batches)):
            storage.iter = it
            done.append(guarded_run_step(trainer, guard))
    return done, guard, storage


@pytest.mark.parametrize("norm", ["SyncBN", "CBN", "MABN"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_bad_batch_is_a_no_op(norm, bad_value):
    """A run with an extra non-finite batch ends in exactly the state of the run without it
    (parameters, optimizer-visible state, running stats, CBN history, MABN buffers)."""
    from d2norm.norms import config_options

    from detectron2.config import get_cfg

    cfg = d2norm.add_d2norm_config(get_cfg())
    cfg.D2NORM.CBN.BURNIN_ITERS = 1
    cfg.D2NORM.MABN.BUFFER_SIZE = 2
    cfg.D2NORM.MABN.WARMUP_ITERS = 2
    options = config_options(cfg, norm) if norm in d2norm.NORMS else {}
    torch.manual_seed(0)
    ref = _Toy(norm, **options)
    torch.manual_seed(0)
    model = _Toy(norm, **options)
    clean = _batches(6)
    bad = clean[3].clone()
    bad[0, :, 2:4, 1:5] = bad_value
    dirty = clean[:3] + [bad] + clean[3:]

    done_ref, _, _ = _train(ref, clean)
    done, guard, storage = _train(model, dirty)
    assert all(done_ref) and done == [True, True, True, False, True, True, True]
    assert guard.skipped == 1
    assert storage.history("skipped_nonfinite_steps").latest() == 1
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_ref[k]), k
        if sd[k].is_floating_point():
            assert torch.isfinite(sd[k]).all(), k
    norms = [m.norm for m in (model.a, model.b)]
    assert any(hasattr(n, "running_var") for n in norms)
    if norm == "CBN":
        assert norms[0].iteration == 6 and norms[0].hist_count.item() == 2  # host mirror restored too


def test_guard_saves_one_cbn_history_slot_not_the_history():
    """What the guard copies per step: every buffer whole, except a CBN history, of which only
    the slot the next forward overwrites ((k-1) times less than the history)."""
    from d2norm.layers import CrossIterationBatchNorm2d

    torch.manual_seed(0)
    model = _Toy("CBN")
    _train(model, _batches(3))  # a full history
    guard = NonFiniteGuard(model)
    saved = guard.snapshot()
    copied = sum(store.numel() for *_, store in saved.entries)
    history = ("hist_grad_sqmean", "hist_grad_mean", "hist_sqmean")
    expected = 0
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is None:
                continue
            if isinstance(m, CrossIterationBatchNorm2d) and name in history:
                assert b.shape[0] == m.buffer_size - 1 == 2
                expected += b[0].numel()
            else:
                expected += b.numel()
    assert copied == expected
    history_numel = sum(b.numel() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in history)
    assert copied < 0.6 * sum(b.numel() for b in model.buffers()) and history_numel > 0


@pytest.mark.parametrize("norm", ["SyncBN", "CBN", "MABN"])
def test_finite_input_that_overflows_the_statistics_is_undone(norm, caplog):
    """A huge but finite batch overflows E[y^2] (running_var -> inf) while the normalized
    output and the loss stay finite: the buffer check catches it."""
    torch.manual_seed(0)
    model = _Toy(norm)
    before = copy.deepcopy(model.state_dict())
    huge = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 1e37
    with torch.no_grad():
        probe = copy.deepcopy(model)
        d2norm.prepare_model(probe)
        loss = sum(probe(huge).values())
    assert torch.isfinite(loss) and not all(torch.isfinite(b).all() for b in probe.buffers())
    with caplog.at_level("WARNING", logger="d2norm"):
        done, guard, _ = _train(model, [huge, torch.randn(2, 3, 6, 6)])
    assert done == [False, True] and guard.skipped == 1
    assert "non-finite normalization statistics" in caplog.text
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            assert torch.isfinite(v).all() and not torch.equal(v, before[k]), k


def test_training_stops_after_too_many_consecutive_bad_steps():
    torch.manual_seed(0)
    model = _Toy("MABN")
    nan = torch.full((2, 3, 6, 6), float("nan"))
    with pytest.raises(FloatingPointError, match=r"3 consecutive.*SOLVER.BASE_LR"):
        _train(model, [nan] * 5, max_consecutive=3)


class _Injector:
    """Wraps the trainer's batch iterator: one batch gets NaN pixels, one loses its instances;
    records the model state right before and right after the NaN step."""

    def __init__(self, it, model, nan_at, empty_at):
        self.it, self.model, self.nan_at, self.empty_at = it, model, nan_at, empty_at
        self.calls, self.before, self.after = 0, None, None

    def __iter__(self):
        return self

    def _state(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __next__(self):
        if self.calls == self.nan_at + 1:
            self.after = self._state()
        batch = next(self.it)
        if self.calls == self.nan_at:
            self.before = self._state()
            batch = [dict(d) for d in batch]
            img = batch[0]["image"].float()
            img[:, 10:50, 20:70] = float("nan")
            batch[0]["image"] = img
        if self.calls == self.empty_at:
            batch = [dict(d) for d in batch]
            batch[0]["instances"] = batch[0]["instances"][:0]
        self.calls += 1
        return batch


@pytest.mark.parametrize("norm", ["BN", "CBN", "MABN"])
def test_trainer_skips_nan_image_and_continues(tmp_path, data_root, norm):
    from helpers import synthetic_cfg

    from d2norm.engine import Trainer

    cfg = synthetic_cfg(
        norm,
        **{
            "D2NORM.DATA.ROOT": data_root,
            "SOLVER.MAX_ITER": 4,
            "DATASETS.TEST": (),
            "D2NORM.CBN.BURNIN_ITERS": 1,
            "D2NORM.MABN.WARMUP_ITERS": 1,
            "D2NORM.MABN.BUFFER_SIZE": 2,
            "OUTPUT_DIR": str(tmp_path),
        },
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    inj = _Injector(iter(trainer._trainer._data_loader_iter), trainer.model, nan_at=2, empty_at=1)
    if "_data_loader_iter_obj" in vars(trainer._trainer):  # detectron2 after v0.6: a property
        trainer._trainer._data_loader_iter_obj = inj
    else:
        trainer._trainer._data_loader_iter = inj
    trainer.train()
    assert inj.after is not None
    for k, v in inj.before.items():  # nothing at all changed during the NaN step
        assert torch.equal(inj.after[k], v), k
    final = trainer.model.state_dict()
    stats = [k for k in final if k.endswith(("running_mean", "running_var", "buffer_x2", "hist_sqmean"))]
    assert stats
    for k in stats:
        assert torch.isfinite(final[k]).all(), k
    changed = [k for k in stats if not torch.equal(final[k], inj.after[k])]
    assert changed  # the step after the NaN step trained normally
    storage = trainer.storage
    assert storage.history("skipped_nonfinite_steps").values()[-1][0] == 1
    losses = storage.history("total_loss").values()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v, _ in losses)
    assert trainer._nonfinite_guard.skipped == 1
