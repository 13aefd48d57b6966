"""Guards: a training step whose loss is not finite changes nothing, and training goes on;
datasets are checked before loading (:func:`check_datasets`).

Normalization layers update their state in the *forward* pass, before any loss exists: BN /
SyncBN running mean and variance, the CBN history ring buffers and counters, the MABN ring
buffers, ``iters`` and ``running_var``. One batch with NaN/Inf pixels (or one diverging step)
would leave non-finite running statistics behind for good, and detectron2's trainer would then
stop with a ``FloatingPointError``. :func:`guarded_run_step` runs a step as detectron2's
``SimpleTrainer`` / ``AMPTrainer`` do (``zero_grad_before_forward``, the AMP ``precision``,
``log_grad_scaler``, ``after_backward`` hooks, ``async_write_metrics``, where the installed
detectron2 has them), except that:

1. :class:`NonFiniteGuard` saves, before the forward, what a forward can change: every module
   buffer except a CBN history, of which only the ring slot the forward will overwrite is saved
   (plus the buffer objects themselves, in case a layer re-allocates one), and the plain
   int/float/bool attributes of modules that own buffers (e.g. CBN's host-side counters);
2. the step is *bad* if the forward raises ``FloatingPointError`` (detectron2 raises it when
   predicted proposals are not finite), the total loss is not finite, or a floating-point value
   the forward wrote became non-finite (a huge but finite input can overflow a variance while
   the normalized output, hence the loss, stays finite). Loss and statistics are reduced on the
   device and read with **one** host synchronization per step (detectron2's metric writing
   synchronizes every step anyway);
3. with several processes the "bad" flag is all-reduced, so every process skips the same step
   (a process skipping its backward alone would leave the others waiting in DDP's gradient
   all-reduce);
4. a bad step restores the saved state, zeroes the gradients and skips backward and the
   optimizer step; it is logged (warning) and counted in the event storage as
   ``skipped_nonfinite_steps``. After ``max_consecutive`` bad steps in a row training stops with
   a ``FloatingPointError`` that says what to change.

Under AMP, MABN's backward ring buffer is kept free of the loss scale: before the forward the
step hands the scaler's current scale to every MABN layer
(:func:`d2norm.layers.moving_average_batch_norm.set_grad_scale`), which stores unscaled, finite
values only; an overflowing step is then skipped by the scaler as usual.

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

from ..layers.moving_average_batch_norm import MovingAverageBatchNorm2d, set_grad_scale
from ..norms import spec_of

__all__ = ["NonFiniteGuard", "guarded_run_step", "check_datasets"]

logger = logging.getLogger("d2norm")

_PLAIN = (int, float, bool)


def _unwrap(model):
    return (
        getattr(model, "module", model)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel)
        else model
    )


def _all_finite(tensors):
    """A device bool: every value of ``tensors`` is finite (None for no tensors); no host sync."""
    if not tensors:
        return None
    if len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]
    # the max |value| of each tensor: inf / nan iff the tensor holds one
    return torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()


def _copy_all(dst, src):
    if dst:
        torch._foreach_copy_(dst, src)


class _Saved:
    """What one step may change: [(module, name, buffer object, region, copy)], attributes."""

    __slots__ = ("entries", "attrs")

    def __init__(self):
        self.entries, self.attrs = [], []


class NonFiniteGuard:
    """Save / check / restore of what a training forward changes in a model's modules.

    ``max_consecutive``: number of bad steps in a row after which training stops (0: never).
    """

    def __init__(self, model, max_consecutive=20):
        self.model = _unwrap(model)
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # bad steps so far
        self.consecutive = 0
        self._store = {}  # (module id, name) -> reusable copy
        self._saved = None
        self._local_bad = (False, False)  # (loss, statistics) of the last decision, this process
        self.has_mabn = any(isinstance(m, MovingAverageBatchNorm2d) for m in self.model.modules())

    # ------------------------------------------------------------------ save / restore
    def _region(self, module, name, buf):
        """The part of ``buf`` the next forward may write."""
        spec = spec_of(module)
        slot = getattr(module, "next_history_slot", None)
        if spec is not None and name in spec.history and slot is not None and buf.dim() > 1:
            pos = slot  # the ring slot the next record writes
            if 0 <= pos < buf.shape[0]:
                return buf[pos]
        return buf

    def snapshot(self):
        """Save the state the next training forward may change (see the module docstring)."""
        saved = _Saved()
        dst, src = [], []
        for module in self.model.modules():
            buffers = [(n, b) for n, b in module._buffers.items() if b is not None]
            if not buffers:
                continue
            for name, buf in buffers:
                region = self._region(module, name, buf)
                key = (id(module), name)
                store = self._store.get(key)
                if (
                    store is None
                    or store.shape != region.shape
                    or store.dtype != region.dtype
                    or store.device != region.device
                ):
                    store = self._store[key] = torch.empty_like(region)
                dst.append(store)
                src.append(region)
                saved.entries.append((module, name, buf, region, store))
            saved.attrs.append((module, {k: v for k, v in vars(module).items() if type(v) in _PLAIN}))
        with torch.no_grad():
            _copy_all(dst, src)
        self._saved = saved
        return saved

    def restore(self, saved=None):
        """Put back the state saved by :meth:`snapshot`."""
        saved = saved or self._saved
        dst, src = [], []
        with torch.no_grad():
            for module, name, buf, region, store in saved.entries:
                if module._buffers.get(name) is not buf:  # the layer re-allocated it
                    module._buffers[name] = buf
                dst.append(region)
                src.append(store)
            _copy_all(dst, src)
        for module, attrs in saved.attrs:
            for name, value in attrs.items():
                setattr(module, name, value)

    # ------------------------------------------------------------------ the decision
    def _written(self, saved):
        """The floating-point tensors the forward may have written (after it ran)."""
        out = []
        for module, name, buf, region, _ in saved.entries:
            current = module._buffers.get(name)
            t = region if current is buf else current
            if t is not None and t.is_floating_point() and t.numel() > 0:
                out.append(t)
        return out

    def state_finite(self, saved=None):
        """A device bool (None if there is nothing to check): whether every value the last
        forward may have written is finite (after :meth:`snapshot`; else every buffer)."""
        saved = saved or self._saved
        if saved is not None:
            tensors = self._written(saved)
        else:
            tensors = [b for b in self.model.buffers() if b.is_floating_point() and b.numel() > 0]
        return _all_finite(tensors)

    def buffers_finite(self):
        """Whether every floating-point buffer of the model is finite (one host sync)."""
        ok = _all_finite([b for b in self.model.buffers() if b.is_floating_point() and b.numel() > 0])
        return True if ok is None else bool(ok)

    def step_is_bad(self, losses, error, device):
        """True if this step must be skipped, on every process alike (all-reduced flag); one
        host synchronization. Remembers which local check failed, for :meth:`record`."""
        self._local_bad = (False, False)
        if error is not None or losses is None:
            local = torch.ones(2, device=device)
        else:
            loss_ok = torch.isfinite(losses.detach()).all()
            state_ok = self.state_finite() if self._saved is not None else None
            state_ok = loss_ok.new_ones(()) if state_ok is None else state_ok.to(loss_ok.device)
            local = torch.stack([loss_ok, state_ok]).logical_not().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            local = local.to(device)
            any_bad = local.max().reshape(1)
            dist.all_reduce(any_bad, op=dist.ReduceOp.MAX)
            loss_bad, state_bad, bad = torch.cat([local, any_bad]).tolist()
        else:
            loss_bad, state_bad = local.tolist()
            bad = max(loss_bad, state_bad)
        self._local_bad = (loss_bad > 0, state_bad > 0)
        return bad > 0

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
            loss_bad, state_bad = self._local_bad
            if bad_terms or loss_bad:
                why = f"non-finite losses {bad_terms or values}"
            elif state_bad:
                why = "non-finite normalization statistics (buffers)"
            else:
                why = "another process had a non-finite step"
        logger.warning(
            "Iteration %d: skipped a non-finite training step (%s). Norm running statistics and "
            "buffers were restored, no optimizer step was taken (%d skipped so far).",
            iteration,
            why,
            self.skipped,
        )
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive training steps had a non-finite loss (last at "
                f"iteration {iteration}: {why}); training has diverged. Fix: lower SOLVER.BASE_LR "
                "or raise SOLVER.WARMUP_ITERS, enable gradient clipping (SOLVER.CLIP_GRADIENTS), "
                "or check the input images for NaN/Inf values."
            )


def _first_param_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _autocast(trainer, device):
    dtype = getattr(trainer, "precision", torch.float16)
    return torch.autocast(device.type, dtype=dtype)


def guarded_run_step(trainer, guard, after_backward=None):
    """One training step of detectron2's ``SimpleTrainer`` / ``AMPTrainer`` ``trainer`` that
    skips (and undoes) a non-finite step; see the module docstring. ``after_backward``: called
    after the backward (default: ``trainer.after_backward`` where detectron2 has it). Returns
    whether the step was taken."""
    from detectron2.utils.events import get_event_storage

    assert trainer.model.training, "[guarded_run_step] model was changed to eval mode!"
    scaler = getattr(trainer, "grad_scaler", None)
    amp = scaler is not None
    device = _first_param_device(trainer.model)
    start = time.perf_counter()
    data = next(trainer._data_loader_iter)
    data_time = time.perf_counter() - start

    zero_first = getattr(trainer, "zero_grad_before_forward", False)
    if zero_first:
        trainer.optimizer.zero_grad()
    if amp and guard.has_mabn:
        # MABN keeps its backward ring buffer in unscaled units
        set_grad_scale(guard.model, scaler.scale(torch.ones((), device=device)))
    guard.snapshot()
    loss_dict = losses = error = None
    try:
        with _autocast(trainer, device) if amp else contextlib.nullcontext():
            loss_dict = trainer.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses, loss_dict = loss_dict, {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
    except FloatingPointError as e:  # detectron2: "Predicted boxes or scores contain Inf/NaN"
        error = e
    if isinstance(losses, torch.Tensor):
        device = losses.device
    bad = guard.step_is_bad(losses, error, device)
    storage = get_event_storage()
    if bad:
        guard.restore()
        trainer.optimizer.zero_grad()
        storage.put_scalar("skipped_nonfinite_steps", guard.skipped + 1, smoothing_hint=False)
        guard.record(True, storage.iter, loss_dict, error)
        return False
    guard.record(False, storage.iter, loss_dict, None)

    if not zero_first:
        trainer.optimizer.zero_grad()
    if amp:
        scaler.scale(losses).backward()
        if getattr(trainer, "log_grad_scaler", False):
            storage.put_scalar("[metric]grad_scaler", scaler.get_scale())
    else:
        losses.backward()
    after_backward = after_backward or getattr(trainer, "after_backward", None)
    if after_backward is not None:
        after_backward()
    if getattr(trainer, "async_write_metrics", False):
        trainer.concurrent_executor.submit(trainer._write_metrics, loss_dict, data_time, iter=trainer.iter)
    else:
        trainer._write_metrics(loss_dict, data_time)
    if amp:
        scaler.step(trainer.optimizer)
        scaler.update()
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
                f"image_root)), or use one of d2norm's synthetic splits: {', '.join(SPLITS)}."
            )
        meta = MetadataCatalog.get(name)
        for attr, what in (("json_file", "annotation file"), ("image_root", "image folder")):
            path = meta.get(attr, None)
            if isinstance(path, str) and "://" not in path and not os.path.exists(path):
                raise FileNotFoundError(
                    f"The {what} of dataset {name!r} ({key}) does not exist: {path!r}. Fix: "
                    "create it or register the dataset with the right path; for d2norm's "
                    "synthetic splits, delete the split folder and let it be regenerated under "
                    "D2NORM.DATA.ROOT."
                )
