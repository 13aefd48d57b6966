"""Evaluation of a study model beyond detectron2's AP: re-estimated statistics, val loss, predictions.

**Re-estimated statistics** (:func:`reestimate_statistics`, PreciseBN-style). A norm with running
statistics is evaluated with what its training left behind: at P processes, rank 0's moving
average over its own b images per iteration. To separate what training did to the weights from
how well those statistics were estimated, the same weights are also evaluated with statistics
re-estimated over a fixed set of training images, as detectron2's ``PreciseBN`` does: the model
runs in training mode (same proposal sampling as training) without gradients, in batches of the
study's total batch, and every running-statistics norm

* normalizes with the statistics of the current batch (so the layers after it see what training
  mode would give them), and
* accumulates the population statistics of its input over all the batches:
  ``mu = E[x]``, ``var = E[x^2] - mu^2`` (over images, positions and batches),

after which the running buffers are set to them, in the form each layer's eval map reads:

* BN, SyncBN, BN+WS (``_BatchNorm``), CBN: ``gamma (x - running_mean) / sqrt(running_var + eps) + beta``;
  ``running_mean = mu``, ``running_var = var``;
* BRN: ``gamma (x - running_mean) / running_std + beta``; ``running_std = sqrt(var + eps)``;
* MABN: ``gamma x / sqrt(running_var + eps) + beta``; ``running_var = E[x^2]``.

MABN normalizes by the second moment (its convs are weight-centralized), so its batch pass uses
``x / sqrt(E_batch[x^2] + eps)``. Frozen norms (BN*, FrozenStatsBN) and statistic-free norms are
left alone. Unlike a moving average, the estimate does not depend on the number of images per
process that training used: at every b it is the same fixed set of images.

**Val loss** (:func:`validation_loss`): detectron2's training losses on the val split, with every
module in training mode (RPN / RoI sampling as in training) except the norms, which are in eval
mode (they use their running statistics, as at evaluation). No gradients; a fixed RNG seed.
"""

import contextlib
import gzip
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "running_statistics_norms",
    "reestimate_statistics",
    "validation_loss",
    "fixed_batches",
    "save_predictions",
]


def _kind(module):
    """How ``module``'s eval map reads its statistics, or None (nothing to re-estimate)."""
    from d2norm.layers import (
        BatchRenorm2d,
        CrossIterationBatchNorm2d,
        FrozenStatisticsBatchNorm2d,
        MovingAverageBatchNorm2d,
    )

    if isinstance(module, FrozenStatisticsBatchNorm2d):
        return None
    if isinstance(module, MovingAverageBatchNorm2d):
        return "second_moment"
    if isinstance(module, BatchRenorm2d):
        return "std"
    if isinstance(module, CrossIterationBatchNorm2d):
        return "mean_var"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
        return "mean_var"
    return None


def running_statistics_norms(model):
    """[(name, module, kind)] of the norms whose eval map reads running statistics."""
    out = []
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is not None:
            out.append((name, m, kind))
    return out


def _event_storage():
    """detectron2's losses log to an event storage: a throwaway one for forwards outside training."""
    from detectron2.utils.events import EventStorage

    return EventStorage(0)


class _Accumulator:
    """Sums of x and x^2 per channel (float64) and the count, over the batches seen."""

    def __init__(self):
        self.s1 = self.s2 = None
        self.n = 0

    def add(self, x):
        xd = x.detach().to(torch.float64)
        dims = (0, 2, 3)
        s1, s2 = xd.sum(dims), (xd * xd).sum(dims)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.numel() // x.shape[1]

    def mean_var(self):
        mean = self.s1 / self.n
        return mean, (self.s2 / self.n - mean * mean).clamp_min(0.0), self.s2 / self.n


def _batch_forward(module, kind, acc):
    """A forward that normalizes with the current batch's statistics and records them."""

    def forward(x):
        if x.numel() == 0:
            return x * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)
        acc.add(x)
        if kind == "second_moment":
            chi = (x * x).mean(dim=(0, 2, 3), keepdim=True)
            z = x / torch.sqrt(chi + module.eps)
            return z * module.weight.view(1, -1, 1, 1) + module.bias.view(1, -1, 1, 1)
        return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)

    return forward


@contextlib.contextmanager
def _norms_in_eval(model):
    """Training mode for the model, eval mode for every module with train/eval-dependent
    statistics (the running-statistics norms); restores all modes on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.train()
        for _, m, _ in running_statistics_norms(model):
            m.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def reestimate_statistics(model, batches, seed=0):
    """Set every running-statistics norm's buffers to the population statistics of its input over
    ``batches`` (lists of detectron2 training dicts); see the module docstring. Returns the number
    of norms re-estimated. The model's parameters are not changed; its train/eval mode is kept."""
    norms = running_statistics_norms(model)
    if not norms:
        return 0
    accs = [_Accumulator() for _ in norms]
    modes = {m: m.training for m in model.modules()}
    devices_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model.train()
        for (_, m, kind), acc in zip(norms, accs):
            m.forward = _batch_forward(m, kind, acc)
        with _event_storage():
            for batch in batches:
                model(batch)
    finally:
        for _, m, _ in norms:
            m.__dict__.pop("forward", None)
        for m, mode in modes.items():
            m.training = mode
        torch.random.set_rng_state(devices_rng)
    for (name, m, kind), acc in zip(norms, accs):
        if acc.n == 0:
            raise RuntimeError(
                f"Re-estimating statistics: the norm {name!r} saw no input in {len(batches)} "
                "batch(es). Fix: give batches that reach every normalized layer (training images "
                "with annotations)."
            )
        mean, var, second = acc.mean_var()
        if kind == "second_moment":
            m.running_var.copy_(second.to(m.running_var.dtype))
        elif kind == "std":
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_std.copy_(torch.sqrt(var + m.eps).to(m.running_std.dtype))
        else:
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
    return len(norms)


@torch.no_grad()
def validation_loss(model, batches, seed=0):
    """Mean total loss (and each loss term) over ``batches``, norms in eval mode (module docstring)."""
    rng = torch.random.get_rng_state()
    totals, n = {}, 0
    try:
        torch.manual_seed(seed)
        with _norms_in_eval(model), _event_storage():
            for batch in batches:
                losses = model(batch)
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                totals["total_loss"] = totals.get("total_loss", 0.0) + float(sum(losses.values()))
                n += 1
    finally:
        torch.random.set_rng_state(rng)
    out = {k: v / max(n, 1) for k, v in totals.items()}
    return {k: (v if math.isfinite(v) else None) for k, v in out.items()}


def fixed_batches(cfg, dataset_name, num_images, batch_size):
    """The first ``num_images`` images of ``dataset_name`` (ordered by image id), mapped as for
    training (annotations kept), in batches of ``batch_size``. Deterministic."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    dicts = sorted(DatasetCatalog.get(dataset_name), key=lambda d: d["image_id"])
    if num_images:
        dicts = dicts[:num_images]
    mapper = DatasetMapper(cfg, True)
    mapped = [mapper(d) for d in dicts]
    return [mapped[i : i + batch_size] for i in range(0, len(mapped), batch_size)]


def save_predictions(results_json, path):
    """Write detectron2's ``coco_instances_results.json`` as a compact gzipped JSON: per detection
    ``[image_id, category_id, score (4 digits), x, y, w, h (1 decimal)]``. Returns the count."""
    with open(results_json) as f:
        dets = json.load(f)
    rows = [
        [int(d["image_id"]), int(d["category_id"]), round(float(d["score"]), 4)]
        + [round(float(v), 1) for v in d["bbox"]]
        for d in dets
    ]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with gzip.open(tmp, "wt") as f:
        json.dump({"fields": ["image_id", "category_id", "score", "x", "y", "w", "h"], "dets": rows}, f)
    os.replace(tmp, path)
    return len(rows)
