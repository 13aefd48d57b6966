"""Two CPU processes (gloo) started by d2norm.engine.launch.launch, as train_net.py does.

``launch`` spawns 2 CPU processes; a watchdog kills them after a timeout and every collective
times out after 120 s, so nothing hangs forever. Each process checks SyncBatchNorm2d against a
float64 nn.BatchNorm2d on the joint batch (2×1 images, and 2+0 images: one rank with an EMPTY
batch), BCN in both modes against its float64 reference on the joint batch (same cases), and
the non-finite step guard under DDP (NaN on one rank only), then trains CBN, MABN, SyncBN and
BCN+WS Mask R-CNN models a few iterations with the d2norm Trainer (DDP, IMS_PER_BATCH 2)
on a dataset whose images on rank 1 have no annotations. Results are written per rank and
checked here.
"""

import multiprocessing
import os
import threading
from datetime import timedelta

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN_NORMS = ("CBN", "MABN", "SyncBN", "BCN+WS")
pytestmark = pytest.mark.slow  # multi-process
TIMEOUT_S = 300  # the whole 2-process run; each collective additionally times out after 120 s


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread here too (each worker uses cpu_count / 2): on a shared, busy CPU,
    2 OpenMP threads make each op ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------ inside the processes
def _local_step(layer, step, c, lo, hi, total):
    """A joint batch of ``total`` images and an upstream gradient, drawn alike on every rank (same
    seed), and one training forward / backward of ``layer`` on this rank's images [lo, hi):
    ``(x_all, g_all, x, y)``."""
    x_all = torch.randn(total, c, 4, 3) * (step + 2) + step
    g_all = torch.randn_like(x_all)
    x = x_all[lo:hi].clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    (y * g_all[lo:hi]).sum().backward()
    return x_all, g_all, x, y


def _syncbn_case(sizes, steps=2, c=5):
    """SyncBatchNorm2d with ``sizes[r]`` images on rank r vs float64 BN on the joint batch."""
    import torch.distributed as dist
    from torch import nn

    from d2norm.layers import SyncBatchNorm2d

    rank = dist.get_rank()
    torch.manual_seed(0)  # identical on every rank
    ours = SyncBatchNorm2d(c)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ref = nn.BatchNorm2d(c).double()
    ref.load_state_dict(ours.state_dict())
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    diffs = {"out": 0.0, "grad_in": 0.0, "grad_w": 0.0, "grad_b": 0.0, "running": 0.0}
    for step in range(steps):
        x_all, g_all, x, y = _local_step(ours, step, c, lo, hi, sum(sizes))
        gw, gb = ours.weight.grad.clone(), ours.bias.grad.clone()
        dist.all_reduce(gw)  # what DDP does with the per-rank parameter gradients (sum)
        dist.all_reduce(gb)
        xr = x_all.double().requires_grad_()
        ref.zero_grad()
        yr = ref(xr)
        (yr * g_all.double()).sum().backward()
        diffs["out"] = max(diffs["out"], (y.double() - yr[lo:hi]).abs().max().item() if y.numel() else 0.0)
        gi = x.grad if x.grad is not None else torch.zeros_like(x)
        diffs["grad_in"] = max(
            diffs["grad_in"], (gi.double() - xr.grad[lo:hi]).abs().max().item() if x.numel() else 0.0
        )
        diffs["grad_w"] = max(diffs["grad_w"], (gw.double() - ref.weight.grad).abs().max().item())
        diffs["grad_b"] = max(diffs["grad_b"], (gb.double() - ref.bias.grad).abs().max().item())
        diffs["running"] = max(
            diffs["running"],
            (ours.running_mean.double() - ref.running_mean).abs().max().item(),
            (ours.running_var.double() - ref.running_var).abs().max().item(),
        )
    diffs["shape_ok"] = tuple(y.shape) == (hi - lo, c, 4, 3)
    return diffs


def _bcn_case(sizes, mode, steps=3, c=8, groups=4):
    """BCN with ``sizes[r]`` images on rank r vs the float64 reference on the joint batch."""
    import torch.distributed as dist

    from d2norm.layers import BatchChannelNorm2d
    from d2norm.testing.bcn_reference import BCNReference

    rank = dist.get_rank()
    torch.manual_seed(0)  # identical on every rank
    ours = BatchChannelNorm2d(c, groups, mode=mode, moving_speed=0.3)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    ref = BCNReference(c, groups, ours.eps, mode, 0.3, "cumulative")
    pairs = {"gamma_b": ours.bn.weight, "beta_b": ours.bn.bias, "gamma_c": ours.weight, "beta_c": ours.bias}
    params = {k: v.detach().double().requires_grad_() for k, v in pairs.items()}
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    diffs = {"out": 0.0, "grad_in": 0.0, "grad_params": 0.0, "running": 0.0}
    for step in range(steps):
        x_all, g_all, x, y = _local_step(ours, step, c, lo, hi, sum(sizes))
        xr = x_all.double().requires_grad_()
        for p in params.values():
            p.grad = None
        yr = ref.step(xr, params)
        (yr * g_all.double()).sum().backward()
        for k, p in pairs.items():
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)  # what DDP does with the per-rank parameter gradients (sum)
            diffs["grad_params"] = max(
                diffs["grad_params"], (grad.double() - params[k].grad).abs().max().item()
            )
        if x.numel():
            diffs["out"] = max(diffs["out"], (y.double() - yr[lo:hi]).abs().max().item())
            gi = x.grad if x.grad is not None else torch.zeros_like(x)
            diffs["grad_in"] = max(diffs["grad_in"], (gi.double() - xr.grad[lo:hi]).abs().max().item())
        diffs["running"] = max(
            diffs["running"],
            (ours.bn.running_mean.double() - ref.mean).abs().max().item(),
            (ours.bn.running_var.double() - ref.var).abs().max().item(),
        )
    with torch.no_grad():  # the eval map: the same estimates on every rank
        ours.eval()
        y = ours(x_all)
        diffs["eval"] = (y.double() - ref.step(x_all.double(), params, training=False)).abs().max().item()
    diffs["steps_ok"] = int(ours.bn.num_batches_tracked) == steps
    return diffs


def _guard_under_ddp():
    """A NaN batch on rank 1 only: both ranks skip that step (all-reduced decision, no backward
    anywhere, so DDP's reducer is not left waiting), then train on in lockstep."""
    import torch.distributed as dist
    from torch import nn

    import d2norm
    from d2norm.engine.guards import NonFiniteGuard, guarded_run_step
    from d2norm.layers import CrossIterationBatchNorm2d

    from detectron2.engine import SimpleTrainer
    from detectron2.layers import Conv2d
    from detectron2.utils.events import EventStorage

    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(Conv2d(3, 4, 3, bias=False, norm=CrossIterationBatchNorm2d(4)))
    d2norm.prepare_model(net)
    ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)

    class Loss(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return {"loss": self.m(x).pow(2).mean()}

    gen = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(4)]
    if rank == 1:
        batches[1][0, 0, 0, 0] = float("nan")
    model = Loss(ddp)
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = NonFiniteGuard(model)
    done = []
    with EventStorage(0) as storage:
        for it in range(4):
            storage.iter = it
            done.append(guarded_run_step(trainer, guard))
    weights = net[0].weight.detach().clone()
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    return {
        "done": done,
        "params_equal": torch.equal(gathered[0], gathered[1]),
        "cbn_iter": net[0].norm.iteration,
        "finite": all(torch.isfinite(b).all().item() for b in net.buffers() if b.is_floating_point()),
    }


def _register_rank_dataset(data_root, rank):
    """'d2norm_dist_train': the tiny split on rank 0; the same images WITHOUT annotations on
    rank 1 (every batch of rank 1 has no instances)."""
    import copy

    from d2norm.data import SHAPE_CLASSES, register_synthetic_datasets

    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_synthetic_datasets(data_root, ["d2norm_shapes_tiny_train"])
    dicts = copy.deepcopy(DatasetCatalog.get("d2norm_shapes_tiny_train"))
    if rank == 1:
        for d in dicts:
            d["annotations"] = []
    DatasetCatalog.register("d2norm_dist_train", lambda: copy.deepcopy(dicts))
    MetadataCatalog.get("d2norm_dist_train").set(thing_classes=list(SHAPE_CLASSES))
    return sum(len(d["annotations"]) for d in dicts)


def _train(norm, data_root, out_dir):
    import torch.distributed as dist
    from helpers import synthetic_cfg

    from d2norm.engine import Trainer

    cfg = synthetic_cfg(
        norm,
        **{
            "D2NORM.DATA.ROOT": data_root,
            "DATASETS.TRAIN": ("d2norm_dist_train",),
            "DATASETS.TEST": (),
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS": False,
            "SOLVER.MAX_ITER": 3,
            "SOLVER.IMS_PER_BATCH": 2,
            "MODEL.ROI_BOX_HEAD.NUM_CONV": 2,
            "OUTPUT_DIR": os.path.join(out_dir, norm),
            "D2NORM.CBN.BURNIN_ITERS": 1,
            "D2NORM.MABN.WARMUP_ITERS": 1,
            "D2NORM.MABN.BUFFER_SIZE": 2,
        },
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    module = model.module if is_ddp else model
    return {
        "ddp": is_ddp,
        "broadcast_buffers": getattr(model, "broadcast_buffers", None),
        "iter": trainer.iter,
        "params": {k: v.detach().clone() for k, v in module.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in module.named_buffers()},
        "skipped": trainer._nonfinite_guard.skipped,
        "world": dist.get_world_size(),
    }


def _worker(out_dir, data_root):
    import time

    import torch.distributed as dist

    t0 = time.time()
    rank = dist.get_rank()
    result = {"backend": dist.get_backend(), "world": dist.get_world_size()}
    result["syncbn_2x1"] = _syncbn_case((1, 1))
    result["syncbn_2+0"] = _syncbn_case((2, 0))
    for mode in ("estimate", "batch"):
        result[f"bcn_{mode}_2x1"] = _bcn_case((1, 1), mode)
        result[f"bcn_{mode}_2+0"] = _bcn_case((2, 0), mode)
    result["guard"] = _guard_under_ddp()
    result["annotations"] = _register_rank_dataset(data_root, rank)
    print(f"rank {rank}: started + SyncBN checks {time.time() - t0:.1f}s", flush=True)
    for norm in TRAIN_NORMS:
        t0 = time.time()
        result[norm] = _train(norm, data_root, out_dir)
        print(f"rank {rank}: {norm} training {time.time() - t0:.1f}s", flush=True)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, data_root):
    from d2norm.engine.launch import launch

    out = str(tmp_path_factory.mktemp("dist"))
    expired = threading.Event()

    def kill_workers():
        expired.set()
        for p in multiprocessing.active_children():
            p.kill()

    watchdog = threading.Timer(TIMEOUT_S, kill_workers)
    watchdog.daemon = True
    watchdog.start()
    try:
        launch(
            _worker, 2, dist_url="auto", args=(out, data_root), device="cpu", timeout=timedelta(seconds=120)
        )
    finally:
        watchdog.cancel()
    assert not expired.is_set(), f"the 2-process run did not finish in {TIMEOUT_S}s"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]


def test_gloo_process_group(ranks):
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert [r["world"] for r in ranks] == [2, 2]


@pytest.mark.parametrize("case", ["syncbn_2x1", "syncbn_2+0"])
def test_sync_bn_equals_bn_on_the_joint_batch(ranks, case):
    for rank, r in enumerate(ranks):
        d = r[case]
        assert d.pop("shape_ok"), (rank, case)
        for key, value in d.items():
            assert value < 2e-5, f"rank {rank}, {case}: max |{key} - float64 BN| = {value}"


@pytest.mark.parametrize("case", ["bcn_estimate_2x1", "bcn_estimate_2+0", "bcn_batch_2x1", "bcn_batch_2+0"])
def test_bcn_statistics_are_those_of_the_joint_batch(ranks, case):
    for rank, r in enumerate(ranks):
        d = r[case]
        assert d.pop("steps_ok"), (rank, case)
        for key, value in d.items():
            assert value < 2e-5, f"rank {rank}, {case}: max |{key} - float64 reference| = {value}"


def test_nonfinite_step_on_one_rank_is_skipped_on_all(ranks):
    for r in ranks:
        g = r["guard"]
        assert g["done"] == [True, False, True, True]
        assert g["params_equal"] and g["finite"] and g["cbn_iter"] == 3


@pytest.mark.parametrize("norm", TRAIN_NORMS)
def test_ddp_training_with_a_rank_without_instances(ranks, norm):
    assert ranks[0]["annotations"] > 0 and ranks[1]["annotations"] == 0
    r0, r1 = ranks[0][norm], ranks[1][norm]
    for r in (r0, r1):
        assert r["ddp"] and r["broadcast_buffers"] is False and r["world"] == 2
        assert r["iter"] == 3 and r["skipped"] == 0  # trained iterations 0, 1, 2
        for k, v in {**r["params"], **r["buffers"]}.items():
            if v.is_floating_point():
                assert torch.isfinite(v).all(), k
    for k in r0["params"]:  # DDP keeps the parameters identical
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    stats = [k for k in r0["buffers"] if k.endswith("running_var")]
    assert stats
    same = [k for k in stats if torch.equal(r0["buffers"][k], r1["buffers"][k])]
    if norm in ("SyncBN", "BCN+WS"):  # statistics of the joint batch: identical on both ranks
        assert same == stats
    else:  # per-process statistics: each rank normalized (and tracked) its own batch
        assert not same
