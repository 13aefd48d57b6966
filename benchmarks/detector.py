"""The Mask R-CNN benchmark as functions: the models (one per norm and its COCO recipe), random
inputs, timed training iterations and inference before / after folding, and the Markdown section.
``benchmarks/model.py`` is its command line; the method is described there.

To add a row: an entry in ``RECIPES`` (recipe + config options), and, for a variant that changes
a built model (like the CBN floor), an entry in ``MODEL_HOOKS``.
"""

import copy
import datetime
import functools
import os
import statistics
import time

import torch

import d2norm  # noqa: F401  (must precede detectron2.layers)
from benchmarks.common import (
    ROOT,
    add_nu_gradient_hooks,
    command_note,
    machine_line,
    median_ms,
    peak_bytes,
    sync,
    time_interleaved,
)
from d2norm.deploy import fold

# norm: (recipe, extra config options). Every norm is timed in the backbone too, with the stem
# and res2 frozen: the 1x SyncBN / GN / CBN recipes (the CBN paper's setting) put the norm in FPN
# and heads only, so their backbone norm is set here, and MABN's official recipe freezes nothing.
RECIPES = {
    "BN*": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", []),
    "BN": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
        ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
        + ["MODEL.ROI_MASK_HEAD.NORM", "BN"],
    ),
    "SyncBN": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
        ["MODEL.RESNETS.NORM", "SyncBN"],
    ),
    "GN": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn.yaml", ["MODEL.RESNETS.NORM", "GN"]),
    "GN+WS": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws.yaml", []),
    "CBN": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml",
        ["MODEL.RESNETS.NORM", "CBN", "D2NORM.CBN.BURNIN_ITERS", "0"],
    ),
    "MABN": (
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn.yaml",  # (official: nothing frozen)
        ["D2NORM.MABN.BUFFER_SIZE", "2", "D2NORM.MABN.WARMUP_ITERS", "0", "MODEL.BACKBONE.FREEZE_AT", "2"],
    ),
}
# BRN (past its ramp: r, d clipped at the full bounds), FRN + TLU and EvoNorm-S0 in BN's layout
RECIPES.update(
    {
        name: (
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn.yaml",
            [
                k
                for site in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
                for k in (f"MODEL.{site}.NORM", name)
            ]
            + [
                "D2NORM.BRN.RAMP_START_ITER",
                "0",
                "D2NORM.BRN.R_MAX_END_ITER",
                "0",
                "D2NORM.BRN.D_MAX_END_ITER",
                "0",
            ],
        )
        for name in ("BRN", "FRN", "EvoNorm-S0")
    }
)
# BCN+WS (the WS paper's pairing, micro-batch mode) in the GN+WS layout
RECIPES["BCN+WS"] = ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml", [])
# BN plus the one conv weight gradient (dnu/dW) per normalized conv that any exact CBN computes:
# the least a CBN iteration can cost (training only; a BN model at inference)
CBN_FLOOR = "CBN floor"
RECIPES[CBN_FLOOR] = RECIPES["BN"]
NORMS = list(RECIPES)
# variants that change the built model: name -> function(model) applied after building
MODEL_HOOKS = {CBN_FLOOR: add_nu_gradient_hooks}
# variants measured in training only (at inference they equal another row)
TRAINING_ONLY = {CBN_FLOOR}


# fewer RoIs than the recipes (512 sampled RoIs per image in training, 1000 proposals at test):
# the 4conv1fc box head on every RoI would dominate a CPU run; --recipe-rois restores them
SHORT_ROIS = [
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "128",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "500",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "250",
]
# inference keeps exactly this many detections per image whatever the (random) scores, so the
# mask head and mask pasting do the same work for every norm
DETECTIONS = 20
SAME_DETECTIONS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", str(DETECTIONS)]


def build_cfg(norm, device, recipe_rois=False):
    from d2norm import add_d2norm_config

    from detectron2.config import get_cfg

    recipe, opts = RECIPES[norm]
    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", recipe))
    cfg.merge_from_list(
        opts
        + ([] if recipe_rois else SHORT_ROIS)
        + SAME_DETECTIONS
        + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", str(device)]
    )
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

    handles = [
        m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
    ]
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


def build(norm, device, inputs, recipe_rois=False):
    from d2norm import build_model

    from detectron2.solver import build_optimizer

    cfg = build_cfg(norm, device, recipe_rois)
    torch.manual_seed(0)
    model = build_model(cfg)
    calibrate_frozen_bn(model, inputs)
    if norm in MODEL_HOOKS:
        MODEL_HOOKS[norm](model)
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


def measure_training(norms, device, inputs, warmup, reps, recipe_rois=False):
    """Build one model per norm, warm up (the last warm-up iteration profiled for peak memory),
    then time ``reps`` interleaved training iterations. Returns ``(train, built)``:
    ``train[norm] = {ms, min_ms, peak, time_ratio, peak_ratio}`` (ratios to the first norm) and
    ``built[norm] = (model, optimizer, cfg)``."""
    built = {n: build(n, device, inputs, recipe_rois) for n in norms}
    peaks = {}
    for i in range(max(warmup, 1)):
        for n in norms:
            model, opt, _ = built[n]
            try:
                if i == warmup - 1 or warmup < 1:  # the last warm-up step, profiled
                    opt.zero_grad(set_to_none=True)
                    peaks[n] = peak_bytes(functools.partial(train_step, model, opt, inputs), device)
                else:
                    train_step(model, opt, inputs)
            except FloatingPointError as e:
                raise SystemExit(f"{n}: training diverged during warm-up ({e})") from None
    fns = {n: functools.partial(train_step, built[n][0], built[n][1], inputs) for n in norms}
    times = time_interleaved(fns, reps, device)
    train = {n: dict(ms=median_ms(times[n]), min_ms=min(times[n]) * 1e3, peak=peaks[n]) for n in norms}
    ref = train[norms[0]]
    for r in train.values():
        r["time_ratio"] = r["ms"] / ref["ms"]
        r["peak_ratio"] = r["peak"] / ref["peak"]
    return train, built


def measure_inference(models, image, size, reps, device):
    """Per-image inference of each eval-mode model, before and after ``d2norm.deploy.fold``.

    ``models``: ``{norm: model}``. Returns ``(inf_ms, fold_diff, fold_error)``: ``inf_ms[(norm,
    "plain" | "folded")]`` median ms, ``fold_diff[norm]`` the largest FPN feature difference
    relative to the features' scale, ``fold_error`` the last folding failure (or None)."""
    runs = {}
    fold_diff, fold_error = {}, None
    for n, plain in models.items():
        runs[(n, "plain")] = plain.eval()
        try:
            folded = fold(copy.deepcopy(plain)).eval()
        except Exception as e:  # report, keep measuring the rest
            fold_error = f"{type(e).__name__}: {e}"
            print(f"fold failed for {n}: {fold_error}")
            continue
        a, b = fpn_features(plain, image), fpn_features(folded, image)
        scale = max(v.abs().max().item() for v in a.values())
        fold_diff[n] = max((a[k] - b[k]).abs().max().item() for k in a) / max(scale, 1e-12)
        runs[(n, "folded")] = folded
    batch = [{"image": image, "height": size[0], "width": size[1]}]
    with torch.no_grad():
        fns = {k: functools.partial(m, batch) for k, m in runs.items()}
        time_interleaved(fns, 1, device)  # warm-up
        times = time_interleaved(fns, max(reps, 3), device)
    return {k: median_ms(v) for k, v in times.items()}, fold_diff, fold_error


def inference_ratios(inf_ms, norms):
    """``{norm: {ms, ratio}, norm + " folded": {ms, ratio}}``, ratios to the first norm unfolded."""
    base = inf_ms[(norms[0], "plain")]
    out = {}
    for n in norms:
        out[n] = dict(ms=inf_ms[(n, "plain")], ratio=inf_ms[(n, "plain")] / base)
        if (n, "folded") in inf_ms:
            out[n + " folded"] = dict(ms=inf_ms[(n, "folded")], ratio=inf_ms[(n, "folded")] / base)
    return out


def markdown_section(
    cmd,
    device,
    size,
    n_img,
    reps,
    warmup,
    recipe_rois,
    train,
    inf_ms,
    fold_diff,
    fold_error,
    wall_s,
    load_before,
):
    """The "Model" section of docs/benchmarks.md, as lines."""
    ref = next(iter(train))
    lines = [
        "## Model",
        "",
        f"{command_note(cmd)}. Machine: {machine_line(device)}; fp32. "
        f"Date {datetime.date.today().isoformat()}; wall time {wall_s / 60:.1f} min; "
        f"{load_before or 'load unknown'} at the start — shared machine: absolute times are noisy, "
        "the norms were interleaved and the ratios are medians.",
        "",
        f"Mask R-CNN R-50-FPN, each norm's COCO recipe (see `benchmarks/detector.py`), random weights, "
        f"{n_img} synthetic image(s) of {size[0]}×{size[1]} with 3 random box/mask targets each; "
        f"batch statistics over this batch (one process). Median of {reps} interleaved iterations "
        f"after {warmup} warm-up iterations. "
        + (
            "RoIs as in the recipes. "
            if recipe_rois
            else "Fewer RoIs than the recipes (128 sampled per image in training, 250 proposals at test; "
            "`--recipe-rois` for 512 / 1000) to keep the CPU run short. "
        )
        + "BN*'s frozen statistics are set from the data in one forward pass (with identity "
        "statistics and random weights the activations overflow). "
        + "BN* is the detectron2 baseline layout (frozen BN backbone, 2fc box head, no norm in FPN / "
        "heads, stem and res2 frozen); every other norm uses the normalized layout (norm in the "
        'whole backbone, FPN, 4conv1fc box head and mask head), so "vs BN" compares norms on '
        'the same layout and "vs BN*" includes the layout\'s cost. Peak MB: '
        + (
            "`torch.cuda.max_memory_allocated` above the bytes allocated before the iteration."
            if device.type == "cuda"
            else "running sum of the allocation / free events `torch.profiler` (`profile_memory=True`) "
            "records during the last warm-up iteration (forward, backward, SGD step; the previous "
            "gradients freed before it), maximum over time — memory allocated on top of the model "
            "and its optimizer state."
        ),
        "",
        f"### Training iteration (forward + backward + SGD step), ratio to {ref}",
        "",
        "| norm | median ms | time vs "
        + ref
        + " | time vs BN | peak MB | peak vs "
        + ref
        + " | peak vs BN |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    bn = train.get("BN")
    for n, r in train.items():
        lines.append(
            f"| {n} | {r['ms']:.0f} | {r['time_ratio']:.2f}x | "
            + (f"{r['ms'] / bn['ms']:.2f}x" if bn else "–")
            + f" | {r['peak'] / 2**20:.0f} | {r['peak_ratio']:.2f}x | "
            + (f"{r['peak'] / bn['peak']:.2f}x" if bn else "–")
            + " |"
        )
    if bn and "CBN" in train and CBN_FLOOR in train:
        cbn, floor = train["CBN"]["ms"], train[CBN_FLOOR]["ms"]
        lines += [
            "",
            f"CBN floor = BN + one conv weight gradient (dnu/dW) per normalized conv, the "
            f"work any exact CBN adds: {floor / bn['ms']:.2f}x BN. d2norm's CBN: "
            f"{cbn / bn['ms']:.2f}x BN = {cbn / floor:.2f}x its floor.",
        ]
    lines += [
        "",
        f"### Inference per image (eval mode, 1 image of {size[0]}×{size[1]}, {DETECTIONS} detections "
        "kept), before / after folding",
        "",
    ]
    if fold_error:
        lines += [f"Folding failed for some norms ({fold_error}); their folded cells are empty.", ""]
    lines += [
        f"| norm | unfolded ms | vs {ref} | vs BN | folded ms | vs {ref} unfolded | "
        "fold speed-up | max rel. FPN feature diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    norms = [n for (n, kind) in inf_ms if kind == "plain"]
    base = inf_ms[(norms[0], "plain")]
    bn_inf = inf_ms.get(("BN", "plain"))
    for n in norms:
        p = inf_ms[(n, "plain")]
        f = inf_ms.get((n, "folded"))
        lines.append(
            f"| {n} | {p:.0f} | {p / base:.2f}x | "
            + (f"{p / bn_inf:.2f}x" if bn_inf else "–")
            + " | "
            + (f"{f:.0f} | {f / base:.2f}x | {p / f:.2f}x | {fold_diff[n]:.1e} |" if f else "– | – | – | – |")
        )
    if not fold_error:
        lines += [
            "",
            "Folding (`d2norm.deploy.fold`) merges BN, SyncBN, BN*, CBN, MABN and BRN into the "
            "preceding convs and bakes the GN+WS / MABN weight transforms; GN, FRN and EvoNorm-S0 "
            "normalize with per-sample statistics and stay (their fold speed-up measures noise "
            "only).",
        ]
    return lines


# ------------------------------------------------------------------------- the trainer's guard
GUARD_NORMS = ("BN", "CBN", "MABN")


def measure_guard_overhead(norms, device, inputs, reps=5, warmup=2, recipe_rois=False):
    """The cost of d2norm's training step (``d2norm.engine.guards.guarded_run_step`` with its
    ``NonFiniteGuard``, what ``d2norm.engine.Trainer`` runs) against detectron2's
    ``SimpleTrainer.run_step``, on the same model, optimizer and batch, interleaved.

    Returns ``{norm: {"d2": ms, "guarded": ms, "guard": ms}}`` (medians): one detectron2 step,
    one guarded step, and the guard alone (save + the non-finite decision, its one host sync
    included) timed in isolation, which is the cleaner number where step times are noisy."""
    import itertools

    from d2norm.engine.guards import NonFiniteGuard, guarded_run_step

    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

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
                    sync(device)
                    t0 = time.perf_counter()
                    if kind == "d2":
                        trainer.run_step()
                    elif not guarded_run_step(trainer, guard):
                        raise FloatingPointError(f"{norm}: the guard skipped a step")
                    sync(device)
                    if i >= warmup:
                        times[kind].append(time.perf_counter() - t0)
                loss = sum(p.sum() for p in list(model.parameters())[:1])
                sync(device)
                t0 = time.perf_counter()
                guard.snapshot()
                guard.step_is_bad(loss.detach(), None, loss.device)
                sync(device)
                if i >= warmup:
                    times["guard"].append(time.perf_counter() - t0)
        out[norm] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        del model, optimizer, trainer, guard
    return out


def guard_table(res):
    lines = [
        "| norm | detectron2 step ms | d2norm step (guard on) ms | ratio | guard alone ms | guard / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for norm, r in res.items():
        lines.append(
            f"| {norm} | {r['d2']:.0f} | {r['guarded']:.0f} | {r['guarded'] / r['d2']:.3f}x | "
            f"{r['guard']:.1f} | {100 * r['guard'] / r['d2']:.2f}% |"
        )
    return "\n".join(lines)
