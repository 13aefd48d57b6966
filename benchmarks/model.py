#!/usr/bin/env python
"""Mask R-CNN R-50-FPN with each norm: training iteration time and peak memory, inference per
image before and after folding, as ratios to BN* (the detectron2 baseline, frozen BN).

    python benchmarks/model.py [--quick] [--size 256 320] [--images 2] [--device cpu|cuda]
                               [--norms BN* GN ...] [--output docs/benchmarks.md]

Each norm uses its COCO recipe under ``configs/`` (its layout: norm in backbone, FPN, 4conv1fc
box head and mask head; BN* = frozen BN in the backbone, no norm elsewhere), built with random
weights (``MODEL.WEIGHTS ""``), on synthetic random images with three random box / mask targets
each. BN*'s frozen statistics are set from the data (each FrozenBN gets its input's statistics in
one forward pass), as pretrained statistics would be: with identity statistics and random
weights the activations overflow. "BN" is the SyncBN recipe with plain ``BatchNorm2d``. CBN runs without burn-in (its window
filled during warm-up). MABN runs with a 2-iteration buffer and no warm-up, so its moving
averages are in use after the warm-up iterations (its per-iteration work is branch-free and does
not depend on the buffer length or on whether renormalization is active). "CBN floor" is the BN
model that also computes, per normalized conv and training forward, the conv weight gradient
dnu/dW that any exact CBN must compute: the least a CBN iteration can cost (training only). Batch statistics are
per image batch of this process (one device).

* **train**: one iteration = forward with losses, backward, SGD step. After warm-up the norms
  alternate (BN*, BN, SyncBN, ..., BN*, BN, ...) and the median is reported. Peak memory of the
  last warm-up iteration (untimed, the gradients of the previous step freed first): CUDA ``max_memory_allocated`` above the bytes allocated before it; CPU:
  the running sum of allocation / free events recorded by ``torch.profiler``
  (``profile_memory=True``), maximum over time.
* **inference**: eval mode, one image per call, before and after ``d2norm.deploy.fold`` (folding
  eval-mode norms and conv weight transforms into the convs), both interleaved. With random
  weights the scores mean nothing, so the score threshold is 0 and exactly 20 detections per
  image are kept: backbone, RPN, box head, mask head on 20 boxes and mask pasting, the same work
  for every norm. Also reported: the largest difference of the FPN features before / after
  folding, relative to their largest magnitude.

Writes (replaces) the "Model" section of ``--output`` and redraws ``--plot`` (see
``benchmarks/layers.py``, which holds the shared report helpers).
"""
import argparse
import copy
import datetime
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import d2norm  # noqa: E402,F401  (must precede detectron2.layers)


def _load_layers_module():
    spec = importlib.util.spec_from_file_location(
        "_d2norm_bench_layers", os.path.join(ROOT, "benchmarks", "layers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L = _load_layers_module()

RECIPES = {  # norm: (recipe, extra config options)
    "BN*": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", []),
    "BN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
           ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN",
            "MODEL.ROI_MASK_HEAD.NORM", "BN"]),
    "SyncBN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml", []),
    "GN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn.yaml", []),
    "GN+WS": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws.yaml", []),
    "CBN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml", ["D2NORM.CBN.BURNIN_ITERS", "0"]),
    "MABN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml",
             ["D2NORM.MABN.BUFFER_SIZE", "2", "D2NORM.MABN.WARMUP_ITERS", "0"]),
}
# BN plus the one conv weight gradient (dnu/dW) per normalized conv that any exact CBN computes:
# the least a CBN iteration can cost (training only; a BN model at inference)
CBN_FLOOR = "CBN floor"
RECIPES[CBN_FLOOR] = RECIPES["BN"]
NORMS = list(RECIPES)


# fewer RoIs than the recipes (512 sampled RoIs per image in training, 1000 proposals at test):
# the 4conv1fc box head on every RoI would dominate a CPU run; --recipe-rois restores them
SHORT_ROIS = ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "500",
              "MODEL.RPN.POST_NMS_TOPK_TEST", "250"]
# inference keeps exactly this many detections per image whatever the (random) scores, so the
# mask head and mask pasting do the same work for every norm
DETECTIONS = 20
SAME_DETECTIONS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS)]


def build_cfg(norm, device, recipe_rois=False):
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    recipe, opts = RECIPES[norm]
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", recipe))
    cfg.merge_from_list(opts + ([] if recipe_rois else SHORT_ROIS) + SAME_DETECTIONS
                        + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)])
    cfg.freeze()
    return cfg


def calibrate_frozen_bn(model, inputs):
    """Give every FrozenBN the statistics of its input in one forward pass, layer after layer.

    With random weights and identity FrozenBN statistics the activations of R-50 grow until the
    RPN sees Inf; statistics taken from the data (what pretrained BN statistics provide) keep
    them in range. Touches only FrozenBN buffers; the compute is unchanged."""
    from detectron2.layers import FrozenBatchNorm2d

    def pre_hook(m, args):
        x = args[0].detach().float()
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var.clamp(min=1e-3))
        m.weight.fill_(1.0)
        m.bias.zero_()

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    if not handles:
        return model
    try:
        was_training = model.training
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            model.backbone(images.tensor)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return model


def add_nu_gradient_hooks(model):
    """Make every detectron2 ``Conv2d`` with a BatchNorm2d norm also compute dnu/dW, the conv
    weight gradient for grad_output 2y/M, at each training forward (result discarded)."""
    from d2norm.layers.cross_iteration_batch_norm import _conv_padding, sqmean_weight_gradient

    def stash(conv, args):
        conv.__dict__["_bench_input"] = args[0].detach()

    def nu_gradient(conv):
        def hook(bn, args, out):
            x = conv.__dict__.pop("_bench_input", None)
            if bn.training and x is not None:
                with torch.no_grad():
                    sqmean_weight_gradient(x, args[0].detach(), conv.weight.detach(), conv.stride,
                                           _conv_padding(conv), conv.dilation, conv.groups)
        return hook

    n = 0
    for conv in model.modules():
        norm = getattr(conv, "norm", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
            conv.register_forward_pre_hook(stash)
            norm.register_forward_hook(nu_gradient(conv))
            n += 1
    if not n:
        raise RuntimeError("no Conv2d with a BatchNorm2d norm found for the CBN floor")
    return model


def build(norm, device, inputs, recipe_rois=False):
    from detectron2.solver import build_optimizer

    from d2norm import build_model

    cfg = build_cfg(norm, device, recipe_rois)
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_frozen_bn(model, inputs)
    if norm == CBN_FLOOR:
        add_nu_gradient_hooks(model)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.BASE_LR = 1e-4  # a real SGD step, small enough to keep random weights finite
    optimizer = build_optimizer(cfg, model)
    return model.train(), optimizer, cfg


def make_inputs(n_images, size, device, seed=0):
    """Random uint8 images (C, H, W) with three random boxes + filled-box masks each."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(n_images):
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        k = 3
        x0 = torch.randint(0, w // 2, (k,), generator=g).float()
        y0 = torch.randint(0, h // 2, (k,), generator=g).float()
        bw = torch.randint(16, w // 2, (k,), generator=g).float()
        bh = torch.randint(16, h // 2, (k,), generator=g).float()
        boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
        masks = torch.zeros(k, h, w, dtype=torch.bool)
        for i, (a, b, c, d) in enumerate(boxes.long().tolist()):
            masks[i, b:d, a:c] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 80, (k,), generator=g)
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": img.to(device), "instances": inst.to(device), "height": h, "width": w})
    return batch


def train_step(model, optimizer, inputs):
    from detectron2.utils.events import EventStorage

    with EventStorage():  # the RPN / ROI heads log training statistics into one
        losses = model(inputs)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def fpn_features(model, image):
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        return model.backbone(images.tensor)


def get_fold():
    """``d2norm.deploy.fold`` if this checkout has it, else None."""
    try:
        import d2norm.deploy as deploy
    except ImportError:
        return None
    return getattr(deploy, "fold", None)


# ------------------------------------------------------------------------- the trainer's guard
GUARD_NORMS = ("BN", "CBN", "MABN")


def measure_guard_overhead(norms=GUARD_NORMS, device="cpu", n_img=1, size=(128, 160), reps=5,
                           warmup=2, recipe_rois=False):
    """The cost of d2norm's training step (``d2norm.engine.guards.guarded_run_step`` with its
    ``NonFiniteGuard``, what ``d2norm.engine.Trainer`` runs) against detectron2's
    ``SimpleTrainer.run_step``, on the same model, optimizer and batch, interleaved.

    Returns ``{norm: {"d2": ms, "guarded": ms, "guard": ms}}`` (medians): one detectron2 step,
    one guarded step, and the guard alone (save + the non-finite decision, its one host sync
    included) timed in isolation, which is the cleaner number where step times are noisy."""
    import itertools

    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from d2norm.engine.guards import NonFiniteGuard, guarded_run_step

    inputs = make_inputs(n_img, size, device)
    out = {}
    for norm in norms:
        model, optimizer, _ = build(norm, device, inputs, recipe_rois)
        trainer = SimpleTrainer(model, itertools.repeat(inputs), optimizer)
        guard = NonFiniteGuard(model)
        times = {"d2": [], "guarded": [], "guard": []}
        with EventStorage(0) as storage:
            for i in range(warmup + reps):
                storage.iter = trainer.iter = i
                for kind in ("d2", "guarded") if i % 2 else ("guarded", "d2"):
                    L.sync(device)
                    t0 = time.perf_counter()
                    if kind == "d2":
                        trainer.run_step()
                    elif not guarded_run_step(trainer, guard):
                        raise FloatingPointError(f"{norm}: the guard skipped a step")
                    L.sync(device)
                    if i >= warmup:
                        times[kind].append(time.perf_counter() - t0)
                loss = sum(p.sum() for p in list(model.parameters())[:1])
                L.sync(device)
                t0 = time.perf_counter()
                guard.snapshot()
                guard.step_is_bad(loss.detach(), None, loss.device)
                L.sync(device)
                if i >= warmup:
                    times["guard"].append(time.perf_counter() - t0)
        out[norm] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        del model, optimizer, trainer, guard
    return out


def guard_table(res):
    lines = ["| norm | detectron2 step ms | d2norm step (guard on) ms | ratio | guard alone ms | "
             "guard / step |", "|---|---:|---:|---:|---:|---:|"]
    for norm, r in res.items():
        lines.append(f"| {norm} | {r['d2']:.0f} | {r['guarded']:.0f} | {r['guarded'] / r['d2']:.3f}x | "
                     f"{r['guard']:.1f} | {100 * r['guard'] / r['d2']:.2f}% |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="1 image of 128x160, 2 timed repetitions (a smoke run)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="image size (default 256 320; quick 128 160)")
    ap.add_argument("--images", type=int, default=None, help="images per training batch (default 2; quick 1)")
    ap.add_argument("--norms", nargs="+", default=NORMS, choices=NORMS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; quick 2)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="warm-up iterations (default 2: CBN windows of k = 3 are full from then on)")
    ap.add_argument("--recipe-rois", action="store_true",
                    help="the recipes' RoI counts (512 per image in training, 1000 test proposals) "
                         "instead of 128 / 250")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "benchmarks.png"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--guard", action="store_true",
                    help="only measure the trainer's step with its non-finite guard against "
                         "detectron2's SimpleTrainer step (--norms defaults to BN CBN MABN)")
    args = ap.parse_args(argv)
    device = L.setup_device(args)
    if args.guard:
        norms = [n for n in args.norms if n in RECIPES] if args.norms != NORMS else list(GUARD_NORMS)
        size = tuple(args.size or ((128, 160) if args.quick else (256, 320)))
        print(f"{L.machine_line(device)}; {args.images or 1} image(s) of {size[0]}x{size[1]}; "
              f"{L.load_note()}")
        machine = f"{L.machine_line(device)}; {args.images or 1} image(s) of {size[0]}x{size[1]}"
        res = measure_guard_overhead(norms, device, args.images or 1, size, args.reps or 5,
                                     args.warmup, args.recipe_rois)
        print(guard_table(res))
        if not args.no_write:
            body = ("## The trainer's step: non-finite guard against detectron2's step\n\n"
                    f"`python benchmarks/model.py {' '.join(argv or sys.argv[1:])}` ({machine}; "
                    f"{L.load_note()}). Median ms per training step of the same model, optimizer and "
                    "batch: detectron2's `SimpleTrainer.run_step` and d2norm's "
                    "`guarded_run_step` (what `d2norm.engine.Trainer` runs), interleaved; "
                    "\"guard alone\" times the guard's save and decision by themselves.\n\n"
                    + guard_table(res))
            L.update_section(args.output, "guard", body, {"guard": res, "device": str(device)})
            print(f"wrote {args.output}")
        return res
    size = tuple(args.size or ((128, 160) if args.quick else (256, 320)))
    n_img = args.images or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 3)
    norms = [n for n in NORMS if n in args.norms]
    ref = "BN*" if "BN*" in norms else norms[0]
    fold = get_fold()
    t_start = time.time()
    load_before = L.load_note()
    print(f"{L.machine_line(device)}; {n_img} image(s) of {size[0]}x{size[1]}; warm-up {args.warmup}; "
          f"median of {reps}; {load_before}")
    if fold is None:
        print("NOTE: d2norm.deploy.fold is not available in this checkout: inference is measured "
              "before folding only (the 'folded' column stays empty). Add d2norm.deploy.fold and "
              "re-run this script to fill it.")

    # ---------------------------------------------------------------- training iterations
    inputs = make_inputs(n_img, size, device)
    built = {n: build(n, device, inputs, args.recipe_rois) for n in norms}
    peaks = {}
    for i in range(max(args.warmup, 1)):
        for n in norms:
            model, opt, _ = built[n]
            try:
                if i == args.warmup - 1 or args.warmup < 1:  # the last warm-up step, profiled
                    opt.zero_grad(set_to_none=True)
                    peaks[n] = L.peak_bytes(lambda: train_step(model, opt, inputs), device)
                else:
                    train_step(model, opt, inputs)
            except FloatingPointError as e:
                sys.exit(f"{n}: training diverged during warm-up ({e})")
    times = {n: [] for n in norms}
    for _ in range(reps):
        for n in norms:
            L.sync(device)
            t0 = time.perf_counter()
            train_step(built[n][0], built[n][1], inputs)
            L.sync(device)
            times[n].append(time.perf_counter() - t0)
    train = {}
    for n in norms:
        train[n] = dict(ms=statistics.median(times[n]) * 1e3, min_ms=min(times[n]) * 1e3,
                        peak=peaks[n])
    for n in norms:
        train[n]["time_ratio"] = train[n]["ms"] / train[ref]["ms"]
        train[n]["peak_ratio"] = train[n]["peak"] / train[ref]["peak"]
    for n in norms:
        r = train[n]
        print(f"train {n:<7} {r['ms']:8.0f} ms  {r['time_ratio']:.2f}x   peak {r['peak'] / 2**20:7.0f} MB "
              f"{r['peak_ratio']:.2f}x")
    if "BN" in train and "CBN" in train and CBN_FLOOR in train:
        bn_ms, floor_ms = train["BN"]["ms"], train[CBN_FLOOR]["ms"]
        print(f"RATIO CBN / BN {train['CBN']['ms'] / bn_ms:.2f}x; CBN floor / BN {floor_ms / bn_ms:.2f}x; "
              f"CBN / CBN floor {train['CBN']['ms'] / floor_ms:.2f}x")

    # ---------------------------------------------------------------- inference
    models = {}
    norms = [n for n in norms if n != CBN_FLOOR]  # at inference the floor model is BN
    for n in norms:
        model, opt, _ = built[n]
        del opt
        models[(n, "plain")] = model.eval()
    built.clear()
    image = inputs[0]["image"]
    fold_diff = {}
    fold_error = None
    if fold is not None:
        for n in norms:
            plain = models[(n, "plain")]
            folded = copy.deepcopy(plain)
            try:
                folded = fold(folded) or folded
            except Exception as e:  # report, keep measuring the rest
                fold_error = f"{type(e).__name__}: {e}"
                print(f"fold failed for {n}: {fold_error}")
                continue
            folded.eval()
            a, b = fpn_features(plain, image), fpn_features(folded, image)
            scale = max(v.abs().max().item() for v in a.values())
            fold_diff[n] = max((a[k] - b[k]).abs().max().item() for k in a) / max(scale, 1e-12)
            models[(n, "folded")] = folded
    keys = list(models)
    with torch.no_grad():
        for k in keys:  # warm-up
            models[k]([{"image": image, "height": size[0], "width": size[1]}])
        inf_t = {k: [] for k in keys}
        for _ in range(max(reps, 3)):
            for k in keys:
                L.sync(device)
                t0 = time.perf_counter()
                models[k]([{"image": image, "height": size[0], "width": size[1]}])
                L.sync(device)
                inf_t[k].append(time.perf_counter() - t0)
    inf_ms = {k: statistics.median(v) * 1e3 for k, v in inf_t.items()}
    base = inf_ms[(ref, "plain")]
    inference = {}
    for n in norms:
        inference[n] = dict(ms=inf_ms[(n, "plain")], ratio=inf_ms[(n, "plain")] / base)
        if (n, "folded") in inf_ms:
            inference[n + " folded"] = dict(ms=inf_ms[(n, "folded")], ratio=inf_ms[(n, "folded")] / base)
    for n in norms:
        f = inf_ms.get((n, "folded"))
        print(f"infer {n:<7} {inf_ms[(n, 'plain')]:7.0f} ms {inf_ms[(n, 'plain')] / base:.2f}x"
              + (f"   folded {f:7.0f} ms {f / base:.2f}x (speed-up {inf_ms[(n, 'plain')] / f:.2f}x, "
                 f"max rel. feature diff {fold_diff[n]:.1e})" if f else ""))
    wall = time.time() - t_start

    # ---------------------------------------------------------------- report
    cmd = "python benchmarks/model.py" + (" --quick" if args.quick else "")
    if args.size:
        cmd += f" --size {size[0]} {size[1]}"
    if args.images:
        cmd += f" --images {n_img}"
    if args.device != "cpu":
        cmd += f" --device {args.device}"
    if args.threads:
        cmd += f" --threads {args.threads}"
    if args.recipe_rois:
        cmd += " --recipe-rois"
    lines = [
        "## Model",
        "",
        f"Command: `{cmd}` (run under `nice -n 15`). Machine: {L.machine_line(device)}; fp32. "
        f"Date {datetime.date.today().isoformat()}; wall time {wall / 60:.1f} min; "
        f"{load_before or 'load unknown'} at the start — shared machine: absolute times are noisy, "
        "the norms were interleaved and the ratios are medians.",
        "",
        f"Mask R-CNN R-50-FPN, each norm's COCO recipe (see `benchmarks/model.py`), random weights, "
        f"{n_img} synthetic image(s) of {size[0]}×{size[1]} with 3 random box/mask targets each; "
        f"batch statistics over this batch (one process). Median of {reps} interleaved iterations "
        f"after {args.warmup} warm-up iterations. "
        + ("RoIs as in the recipes. " if args.recipe_rois else
           "Fewer RoIs than the recipes (128 sampled per image in training, 250 proposals at test; "
           "`--recipe-rois` for 512 / 1000) to keep the CPU run short. ")
        + "BN*'s frozen statistics are set from the data in one forward pass (with identity "
        "statistics and random weights the activations overflow). "
        + "BN* is the detectron2 baseline layout (frozen BN backbone, 2fc box head, no norm in FPN / "
        "heads, stem and res2 frozen); every other norm uses the normalized layout (norm in the "
        "whole backbone, FPN, 4conv1fc box head and mask head), so \"vs BN\" compares norms on "
        "the same layout and \"vs BN*\" includes the layout's cost. Peak MB: "
        + ("`torch.cuda.max_memory_allocated` above the bytes allocated before the iteration."
           if device.type == "cuda" else
           "running sum of the allocation / free events `torch.profiler` (`profile_memory=True`) "
           "records during the last warm-up iteration (forward, backward, SGD step; the previous "
           "gradients freed before it), maximum over time — memory allocated on top of the model "
           "and its optimizer state."),
        "",
        f"### Training iteration (forward + backward + SGD step), ratio to {ref}",
        "",
        "| norm | median ms | time vs " + ref + " | time vs BN | peak MB | peak vs " + ref
        + " | peak vs BN |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    bn = train.get("BN")
    for n in train:
        r = train[n]
        lines.append(f"| {n} | {r['ms']:.0f} | {r['time_ratio']:.2f}x | "
                     + (f"{r['ms'] / bn['ms']:.2f}x" if bn else "–")
                     + f" | {r['peak'] / 2**20:.0f} | {r['peak_ratio']:.2f}x | "
                     + (f"{r['peak'] / bn['peak']:.2f}x" if bn else "–") + " |")
    if bn and "CBN" in train and CBN_FLOOR in train:
        cbn, floor = train["CBN"]["ms"], train[CBN_FLOOR]["ms"]
        lines += ["", f"CBN floor = BN + one conv weight gradient (dnu/dW) per normalized conv, the "
                  f"work any exact CBN adds: {floor / bn['ms']:.2f}x BN. d2norm's CBN: "
                  f"{cbn / bn['ms']:.2f}x BN = {cbn / floor:.2f}x its floor."]
    lines += [
        "",
        f"### Inference per image (eval mode, 1 image of {size[0]}×{size[1]}, {DETECTIONS} detections "
        "kept), before / after folding",
        "",
    ]
    if fold is None:
        lines += ["`d2norm.deploy.fold` was not available when this section was generated: only the "
                  "unfolded times are shown. Re-run the command above to add the folded column.", ""]
    elif fold_error:
        lines += [f"Folding failed for some norms ({fold_error}); their folded cells are empty.", ""]
    lines += [f"| norm | unfolded ms | vs {ref} | vs BN | folded ms | vs {ref} unfolded | "
              "fold speed-up | max rel. FPN feature diff |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    bn_inf = inf_ms.get(("BN", "plain"))
    for n in norms:
        p = inf_ms[(n, "plain")]
        f = inf_ms.get((n, "folded"))
        lines.append(f"| {n} | {p:.0f} | {p / base:.2f}x | "
                     + (f"{p / bn_inf:.2f}x" if bn_inf else "–") + " | "
                     + (f"{f:.0f} | {f / base:.2f}x | {p / f:.2f}x | {fold_diff[n]:.1e} |" if f else
                        "– | – | – | – |"))
    if fold is not None and not fold_error:
        lines += ["", "Folding (`d2norm.deploy.fold`) merges BN, SyncBN, BN*, CBN and MABN into the "
                  "preceding convs and bakes the GN+WS / MABN weight transforms; GN normalizes with "
                  "per-sample statistics and stays (its row measures noise only)."]
    if not args.no_write:
        L.update_section(args.output, "model", "\n".join(lines),
                         {"train": train, "inference": inference,
                          "size": f"{n_img}x{size[0]}x{size[1]}", "device": str(device)})
        L.draw_chart(args.output, args.plot)
        print(f"wrote {args.output} and {args.plot} ({wall / 60:.1f} min)")
    return train, inference


if __name__ == "__main__":
    main()
