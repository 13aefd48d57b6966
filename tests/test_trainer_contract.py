"""The guarded training step keeps detectron2's step contract (after_backward hooks,
zero_grad_before_forward, AMP precision and gradient scaler, async metrics); MABN under a
gradient scaler; the trainer's loader follows DATALOADER.SAMPLER_TRAIN and the evaluator the
dataset's evaluator_type."""

import copy
import math
from collections import Counter

import pytest
import torch
from helpers import synthetic_cfg
from torch import nn

import d2norm  # noqa: I001
from d2norm.engine.guards import NonFiniteGuard, guarded_run_step
from d2norm.layers import MovingAverageBatchNorm2d

from detectron2.engine import HookBase, SimpleTrainer
from detectron2.layers import Conv2d
from detectron2.utils.events import EventStorage


class _ToyMABN(nn.Module):
    """conv+MABN -> conv+MABN -> losses, computed in float32 even under autocast; a batch
    ``(x, overflow)`` with ``overflow`` True multiplies the gradient of the output by inf (what
    an fp16 overflow under a loss scaler does)."""

    def __init__(self):
        super().__init__()
        norm = lambda c: MovingAverageBatchNorm2d(c, buffer_size=2, warmup_iters=0)  # noqa: E731
        self.a = Conv2d(3, 8, 3, padding=1, bias=False, norm=norm(8), activation=torch.relu)
        self.b = Conv2d(8, 8, 3, padding=1, bias=False, norm=norm(8))
        d2norm.prepare_model(self)
        self.events = []

    def forward(self, batch):
        x, overflow = batch
        self.events.append(
            ("forward", torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        )
        with torch.autocast("cpu", enabled=False):
            y = self.b(self.a(x))
            if overflow:  # every norm's backward sees non-finite gradients
                y.register_hook(lambda g: g * math.inf)
            return {"loss_a": (y - 0.3).pow(2).mean(), "loss_b": y.mean().abs()}


def _batches(n, overflow_at=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 6, 6, generator=g) * 2 + 1, i == overflow_at) for i in range(n)]


def _run_guarded(trainer, n, guard=None, **kwargs):
    guard = guard or NonFiniteGuard(trainer.model)
    taken = []
    with EventStorage(0) as storage:
        for it in range(n):
            storage.iter = trainer.iter = it
            taken.append(guarded_run_step(trainer, guard, **kwargs))
    return taken


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_mabn_under_a_grad_scaler_with_one_overflow_keeps_training_exactly():
    """Scaled run (GradScaler on CPU, scale doubling every clean step, one injected overflow)
    against an unscaled float32 run of the same model: after the overflow, training goes on,
    the ring buffers stay finite, and the gradients equal the unscaled ones (so no scale leaks
    into MABN's backward average)."""
    n, overflow_at = 8, 3
    torch.manual_seed(0)
    model = _ToyMABN()
    reference = copy.deepcopy(model)
    batches = _batches(n, overflow_at)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = SimpleTrainer(model, batches, opt)
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    trainer.precision = torch.bfloat16
    guard = NonFiniteGuard(model)
    grads, scales = [], []
    with EventStorage(0) as storage:
        for it in range(n):
            storage.iter = trainer.iter = it
            scales.append(trainer.grad_scaler.get_scale())
            assert guarded_run_step(trainer, guard)  # the guard never fires: losses are finite
            grads.append(_grads(model))
            for name, buf in model.named_buffers():
                assert torch.isfinite(buf).all(), (it, name)

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for it, (x, overflow) in enumerate(batches):
        ref_opt.zero_grad()
        losses = sum(reference((x, False)).values())
        if overflow:  # the scaler skipped this step: forward state only, no gradient, no update
            continue
        losses.backward()
        for name, g in _grads(reference).items():
            torch.testing.assert_close(grads[it][name], g, rtol=1e-5, atol=1e-7, msg=f"step {it} {name}")
        ref_opt.step()

    assert scales[overflow_at + 1] == scales[overflow_at] / 2  # the scaler saw the overflow
    assert len(set(scales)) > 3  # and the scale kept changing
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert ("forward", torch.bfloat16) in model.events  # the AMP precision setting is used


def test_after_backward_hook_runs_once_per_step(tmp_path, data_root):
    from d2norm.engine import Trainer

    class Probe(HookBase):
        def __init__(self):
            self.events = []

        def before_step(self):
            self.events.append(("before_step", self.trainer.iter))

        def after_backward(self):
            grads = [p.grad for p in self.trainer.model.parameters() if p.grad is not None]
            self.events.append(("after_backward", self.trainer.iter, bool(grads)))

        def after_step(self):
            self.events.append(("after_step", self.trainer.iter))

    cfg = synthetic_cfg(
        "GN",
        **{
            "D2NORM.DATA.ROOT": data_root,
            "SOLVER.MAX_ITER": 3,
            "DATASETS.TEST": (),
            "OUTPUT_DIR": str(tmp_path),
        },
    )
    trainer = Trainer(cfg)
    probe = Probe()
    trainer.register_hooks([probe])
    trainer.resume_or_load(resume=False)
    trainer.train()
    expected = []
    for it in range(3):
        expected += [("before_step", it), ("after_backward", it, True), ("after_step", it)]
    assert probe.events == expected


def test_zero_grad_before_forward_is_honoured():
    for zero_first in (False, True):
        model = _ToyMABN()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        trainer = SimpleTrainer(model, _batches(2), opt)
        trainer.zero_grad_before_forward = zero_first
        order = model.events
        original = opt.zero_grad
        opt.zero_grad = lambda *a, order=order, original=original, **k: (
            order.append(("zero_grad",)),
            original(*a, **k),
        )
        _run_guarded(trainer, 2)
        names = [e[0] for e in order]
        first = ["zero_grad", "forward"] if zero_first else ["forward", "zero_grad"]
        assert names == first * 2


def test_async_write_metrics_is_honoured():
    model = _ToyMABN()
    trainer = SimpleTrainer(model, _batches(3), torch.optim.SGD(model.parameters(), lr=0.01))
    if not hasattr(trainer, "concurrent_executor"):
        pytest.skip("this detectron2 has no async_write_metrics")
    trainer.async_write_metrics = True
    submitted = []
    submit = trainer.concurrent_executor.submit
    trainer.concurrent_executor.submit = lambda fn, *a, **k: (
        submitted.append(k.get("iter")),
        submit(fn, *a, **k),
    )
    _run_guarded(trainer, 3)
    trainer.concurrent_executor.shutdown(wait=True)
    assert submitted == [0, 1, 2]


# ----------------------------------------------------------------------------- data and evaluation
def _repeat_factor_reference(dataset, threshold):
    """r(image) = max over its categories c of max(1, sqrt(t / f(c))), f(c) = fraction of images
    containing c (LVIS paper, eq. in sec. 5); computed here from the annotations."""
    cats = [{a["category_id"] for a in d["annotations"]} for d in dataset]
    freq = Counter(c for s in cats for c in s)
    n = len(dataset)
    return [max((max(1.0, math.sqrt(threshold / (freq[c] / n))) for c in s), default=1.0) for s in cats]


def test_repeat_factor_sampler_config_is_honoured(data_root):
    from d2norm.engine.data import build_sampler

    from detectron2.data import get_detection_dataset_dicts

    cfg = synthetic_cfg(
        "GN", **{"D2NORM.DATA.ROOT": data_root, "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler"}
    )
    dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN)
    freq = sorted(Counter(c for d in dataset for c in {a["category_id"] for a in d["annotations"]}).values())
    cfg.DATALOADER.REPEAT_THRESHOLD = 2.0 * freq[0] / len(dataset)  # the rarest class repeats ~1.4x
    expected = _repeat_factor_reference(dataset, cfg.DATALOADER.REPEAT_THRESHOLD)
    assert max(expected) > 1.2

    sampler = build_sampler(cfg, dataset, seed=3, skip=0, rank=0, world_size=1)
    epochs = 400
    stream = list(itertools_islice(sampler, int(sum(expected) * epochs)))
    counts = Counter(stream)
    for i, r in enumerate(expected):  # stochastic rounding: E[copies per epoch] = r
        assert abs(counts[i] / epochs - r) < 0.15, (i, counts[i] / epochs, r)
    # resumable: skipping k samples continues the same stream
    resumed = build_sampler(cfg, dataset, seed=3, skip=50, rank=0, world_size=1)
    assert list(itertools_islice(resumed, 100)) == stream[50:150]


def test_trainer_loader_uses_the_configured_sampler(tmp_path, data_root):
    from d2norm.engine import Trainer

    from detectron2.data.samplers import RepeatFactorTrainingSampler

    cfg = synthetic_cfg(
        "GN",
        **{
            "D2NORM.DATA.ROOT": data_root,
            "OUTPUT_DIR": str(tmp_path),
            "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
            "DATALOADER.REPEAT_THRESHOLD": 0.5,
            "DATASETS.TEST": (),
        },
    )
    loader = Trainer.build_train_loader(cfg)
    real = loader.build()
    samplers = []
    seen, stack = set(), [real]
    while stack:  # find the sampler inside detectron2's loader objects
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, RepeatFactorTrainingSampler):
            samplers.append(obj)
        stack += [v for v in getattr(obj, "__dict__", {}).values() if hasattr(v, "__dict__")]
    assert samplers
    with pytest.raises(ValueError, match="NoSuchSampler"):
        cfg.DATALOADER.SAMPLER_TRAIN = "NoSuchSampler"
        Trainer.build_train_loader(cfg).build()


def test_evaluator_follows_evaluator_type(tmp_path, data_root):
    from d2norm.engine import Trainer

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator, SemSegEvaluator

    cfg = synthetic_cfg("GN", **{"D2NORM.DATA.ROOT": data_root, "OUTPUT_DIR": str(tmp_path)})
    coco = Trainer.build_evaluator(cfg, "d2norm_shapes_tiny_val")
    assert isinstance(coco, COCOEvaluator)
    assert coco._use_fast_impl == d2norm.compiled_ops_available()
    for name, meta in (
        ("t13_semseg", {"evaluator_type": "sem_seg", "stuff_classes": ["a", "b"], "ignore_label": 255}),
        ("t13_untyped", {}),
    ):
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, lambda: [])
            MetadataCatalog.get(name).set(**meta)
    assert isinstance(Trainer.build_evaluator(cfg, "t13_semseg"), SemSegEvaluator)
    with pytest.raises(NotImplementedError, match="evaluator_type"):
        Trainer.build_evaluator(cfg, "t13_untyped")


def itertools_islice(iterable, n):
    import itertools

    return itertools.islice(iter(iterable), n)
