"""Guards: a training step whose loss is not finite changes nothing, and training goes on;
datasets are checked before loading (:func:`check_datasets`).

Normalization layers update their state in the *forward* pass, before any loss exists: BN /
SyncBN running mean and variance, the CBN history ring buffers and counters, the MABN ring
buffers, ``iters`` and ``running_var``. One batch with NaN/Inf pixels (or one diverging step)
would leave non-finite running statistics behind for good, and detectron2's trainer would then
stop with a ``FloatingPointError``. :func:`guarded_run_step` runs a step as detectron2's
``SimpleTrainer`` / ``AMPTrainer`` do, except that:

1. :class:`NonFiniteGuard` snapshots every module buffer (and the plain int/float/bool
   attributes of modules that own buffers, e.g. CBN's host-side counters) before the forward;
2. the step is *bad* if the forward raises ``FloatingPointError`` (detectron2 raises it when
   predicted proposals are not finite), the total loss is not finite, or a floating-point
   buffer became non-finite during the forward (a huge but finite input can overflow a
   variance while the normalized output, hence the loss, stays finite);
3. with several processes the "bad" flag is all-reduced, so every process skips the same step
   (a process skipping its backward alone would leave the others waiting in DDP's gradient
   all-reduce);
4. a bad step restores the snapshot, zeroes the gradients and skips backward and the optimizer
   step; it is logged (warning) and counted in the event storage as ``skipped_nonfinite_steps``.
   After ``max_consecutive`` bad steps in a row training stops with a ``FloatingPointError``
   that says what to change.

Limitation: with SyncBN, a ``FloatingPointError`` raised on some processes but not others in
the middle of the forward leaves the others in a SyncBN all-reduce until the process-group
timeout. In practice SyncBN spreads the non-finite statistics to every process, so all raise at
the same point.
"""
import contextlib
import logging
import math
import time

import torch
import torch.distributed as dist

__all__ = ["NonFiniteGuard", "guarded_run_step", "check_datasets"]

logger = logging.getLogger("d2norm")

_PLAIN = (int, float, bool)


def _unwrap(model):
    return getattr(model, "module", model) if isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model


class NonFiniteGuard:
    """Snapshot / restore of the training-time state of a model's modules (buffers).

    ``max_consecutive``: number of bad steps in a row after which training stops (0: never).
    """

    def __init__(self, model, max_consecutive=20):
        self.model = _unwrap(model)
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # bad steps so far
        self.consecutive = 0
        self._store = {}  # (module id, name) -> reusable snapshot tensor

    # ------------------------------------------------------------------ snapshot / restore
    def snapshot(self):
        """The current state: [(module, {buffer: copy}, {attribute: value})]."""
        snap = []
        for module in self.model.modules():
            buffers = {n: b for n, b in module._buffers.items() if b is not None}
            if not buffers:
                continue
            saved = {}
            for name, buf in buffers.items():
                key = (id(module), name)
                store = self._store.get(key)
                if (store is None or store.shape != buf.shape or store.dtype != buf.dtype
                        or store.device != buf.device):
                    store = self._store[key] = torch.empty_like(buf)
                store.copy_(buf)
                saved[name] = store
            attrs = {k: v for k, v in vars(module).items() if type(v) in _PLAIN}
            snap.append((module, saved, attrs))
        return snap

    @staticmethod
    def restore(snap):
        """Put back the state captured by :meth:`snapshot`."""
        with torch.no_grad():
            for module, saved, attrs in snap:
                for name, value in saved.items():
                    current = module._buffers.get(name)
                    if (current is not None and current.shape == value.shape
                            and current.dtype == value.dtype and current.device == value.device):
                        current.copy_(value)
                    else:  # the layer re-allocated it (e.g. a CBN history) during the forward
                        module._buffers[name] = value.clone()
                for name, value in attrs.items():
                    setattr(module, name, value)

    # ------------------------------------------------------------------ the decision
    def buffers_finite(self):
        """Whether every floating-point buffer of the model is finite (one host sync)."""
        checks = [torch.isfinite(b).all() for b in self.model.buffers()
                  if b.is_floating_point() and b.numel() > 0]
        if not checks:
            return True
        devices = {c.device for c in checks}
        if len(devices) > 1:
            checks = [c.cpu() for c in checks]
        return bool(torch.stack(checks).all())

    def step_is_bad(self, losses, error, device):
        """True if this step must be skipped, on every process alike (all-reduced flag)."""
        bad = (error is not None or losses is None
               or not bool(torch.isfinite(losses.detach()).all()) or not self.buffers_finite())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        return bad

    def record(self, bad, iteration, loss_dict, error):
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if error is not None:
            why = f"{type(error).__name__}: {error}"
        elif loss_dict is None:
            why = "another process had a non-finite step"
        else:
            values = {k: float(v.detach()) for k, v in loss_dict.items()}
            bad_terms = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad_terms:
                why = f"non-finite losses {bad_terms}"
            elif not self.buffers_finite():
                why = "non-finite normalization statistics (buffers)"
            else:
                why = "another process had a non-finite step"
        logger.warning(
            "Iteration %d: skipped a non-finite training step (%s). Norm running statistics and "
            "buffers were restored, no optimizer step was taken (%d skipped so far).",
            iteration, why, self.skipped)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive training steps had a non-finite loss (last at "
                f"iteration {iteration}: {why}); training has diverged. Fix: lower SOLVER.BASE_LR "
                "or raise SOLVER.WARMUP_ITERS, enable gradient clipping (SOLVER.CLIP_GRADIENTS), "
                "or check the input images for NaN/Inf values.")


def _first_param_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def guarded_run_step(trainer, guard):
    """One training step of detectron2's ``SimpleTrainer`` / ``AMPTrainer`` ``trainer`` that
    skips (and undoes) a non-finite step; see the module docstring."""
    from detectron2.engine import AMPTrainer
    from detectron2.utils.events import get_event_storage

    assert trainer.model.training, "[guarded_run_step] model was changed to eval mode!"
    amp = isinstance(trainer, AMPTrainer)
    start = time.perf_counter()
    data = next(trainer._data_loader_iter)
    data_time = time.perf_counter() - start

    snap = guard.snapshot()
    loss_dict = losses = error = None
    try:
        with torch.autocast("cuda") if amp else contextlib.nullcontext():
            loss_dict = trainer.model(data)
        if isinstance(loss_dict, torch.Tensor):
            losses, loss_dict = loss_dict, {"total_loss": loss_dict}
        else:
            losses = sum(loss_dict.values())
    except FloatingPointError as e:  # detectron2: "Predicted boxes or scores contain Inf/NaN"
        error = e
    device = losses.device if isinstance(losses, torch.Tensor) else _first_param_device(trainer.model)
    bad = guard.step_is_bad(losses, error, device)
    storage = get_event_storage()
    if bad:
        guard.restore(snap)
        trainer.optimizer.zero_grad()
        storage.put_scalar("skipped_nonfinite_steps", guard.skipped + 1, smoothing_hint=False)
        guard.record(True, storage.iter, loss_dict, error)
        return False
    guard.record(False, storage.iter, loss_dict, None)

    trainer.optimizer.zero_grad()
    if amp:
        trainer.grad_scaler.scale(losses).backward()
    else:
        losses.backward()
    trainer._write_metrics(loss_dict, data_time)
    if amp:
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        trainer.optimizer.step()
    return True


def check_datasets(names, key):
    """Raise a clear error if a dataset in ``names`` (config key ``key``, e.g. "DATASETS.TRAIN")
    is not registered, or if its annotation file or image folder is missing."""
    import os

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..data.synthetic_shapes import SPLITS

    registered = set(DatasetCatalog.list())
    for name in names:
        if name not in registered:
            raise ValueError(
                f"Dataset {name!r} ({key}) is not registered. Fix: register it before training "
                "(e.g. detectron2.data.datasets.register_coco_instances(name, {}, json_file, "
                f"image_root)), or use one of d2norm's synthetic splits: {', '.join(SPLITS)}.")
        meta = MetadataCatalog.get(name)
        for attr, what in (("json_file", "annotation file"), ("image_root", "image folder")):
            path = meta.get(attr, None)
            if isinstance(path, str) and "://" not in path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"The {what} of dataset {name!r} ({key}) does not exist: {path!r}. Fix: "
                    "create it or register the dataset with the right path; for d2norm's "
                    "synthetic splits, delete the split folder and let it be regenerated under "
                    "D2NORM.DATA.ROOT.")
