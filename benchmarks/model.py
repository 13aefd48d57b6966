#!/usr/bin/env python
"""Mask R-CNN R-50-FPN with each norm: training iteration time and peak memory, inference per
image before and after folding, as ratios to BN* (the detectron2 baseline, frozen BN).

    python benchmarks/model.py [--quick] [--size 256 320] [--images 2] [--device cpu|cuda]
                               [--norms BN* GN ...] [--output docs/benchmarks.md]

Each norm uses its COCO recipe under ``configs/`` (its layout: norm in backbone, FPN, 4conv1fc
box head and mask head; BN* = frozen BN in the backbone, no norm elsewhere), built with random
weights (``MODEL.WEIGHTS ""``), on synthetic random images with three random box / mask targets
each. BN*'s frozen statistics are set from the data (each FrozenBN gets its input's statistics in
one forward pass), as pretrained statistics would be: with identity statistics and random weights
the activations overflow. "BN" is the SyncBN recipe with plain ``BatchNorm2d``. CBN runs without
burn-in (its window filled during warm-up). MABN runs with a 2-iteration buffer and no warm-up, so
its moving averages are in use after the warm-up iterations (its per-iteration work is branch-free
and does not depend on the buffer length or on whether renormalization is active). "CBN floor" is
the BN model that also computes, per normalized conv and training forward, the conv weight gradient
dnu/dW that any exact CBN must compute: the least a CBN iteration can cost (training only). Batch
statistics are per image batch of this process (one device).

* **train**: one iteration = forward with losses, backward, SGD step. After warm-up the norms
  alternate (BN*, BN, SyncBN, ..., BN*, BN, ...) and the median is reported. Peak memory of the
  last warm-up iteration (untimed, the gradients of the previous step freed first): CUDA
  ``max_memory_allocated`` above the bytes allocated before it; CPU:
  the running sum of allocation / free events recorded by ``torch.profiler``
  (``profile_memory=True``), maximum over time.
* **inference**: eval mode, one image per call, before and after ``d2norm.deploy.fold`` (folding
  eval-mode norms and conv weight transforms into the convs), both interleaved. With random
  weights the scores mean nothing, so the score threshold is 0 and exactly 20 detections per
  image are kept: backbone, RPN, box head, mask head on 20 boxes and mask pasting, the same work
  for every norm. Also reported: the largest difference of the FPN features before / after
  folding, relative to their largest magnitude.

Writes (replaces) the "Model" section of ``--output`` and redraws ``--plot``. The work is done by
``benchmarks/detector.py`` (models, measurements, report); shared helpers: ``benchmarks/common.py``.
"""

import argparse
import sys
import time

from benchmarks import detector
from benchmarks.common import (
    DOCS_MD,
    DOCS_PNG,
    draw_chart,
    load_note,
    machine_line,
    setup_device,
    update_section,
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 image of 128x160, 2 timed repetitions (a smoke run)"
    )
    ap.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="image size (default 256 320; quick 128 160)",
    )
    ap.add_argument("--images", type=int, default=None, help="images per training batch (default 2; quick 1)")
    ap.add_argument("--norms", nargs="+", default=detector.NORMS, choices=detector.NORMS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3; quick 2)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="warm-up iterations (default 2: CBN windows of k = 3 are full from then on)",
    )
    ap.add_argument(
        "--recipe-rois",
        action="store_true",
        help="the recipes' RoI counts (512 per image in training, 1000 test proposals) instead of 128 / 250",
    )
    ap.add_argument(
        "--guard",
        action="store_true",
        help="only measure the trainer's step with its non-finite guard against detectron2's "
        "SimpleTrainer step (--norms defaults to BN CBN MABN)",
    )
    ap.add_argument("--output", default=DOCS_MD)
    ap.add_argument("--plot", default=DOCS_PNG)
    ap.add_argument("--no-write", action="store_true")
    return ap.parse_args(argv)


def command_line(args, size, n_img):
    """The command that reproduces this run, for the report."""
    cmd = "python benchmarks/model.py" + (" --quick" if args.quick else "")
    cmd += f" --size {size[0]} {size[1]}" if args.size else ""
    cmd += f" --images {n_img}" if args.images else ""
    cmd += f" --device {args.device}" if args.device != "cpu" else ""
    cmd += f" --threads {args.threads}" if args.threads else ""
    return cmd + (" --recipe-rois" if args.recipe_rois else "")


def guard_main(args, device, argv):
    norms = [n for n in args.norms if n in detector.RECIPES]
    if args.norms == detector.NORMS:
        norms = list(detector.GUARD_NORMS)
    size = tuple(args.size or ((128, 160) if args.quick else (256, 320)))
    n_img = args.images or 1
    machine = f"{machine_line(device)}; {n_img} image(s) of {size[0]}x{size[1]}"
    print(f"{machine}; {load_note()}")
    inputs = detector.make_inputs(n_img, size, device)
    res = detector.measure_guard_overhead(
        norms, device, inputs, args.reps or 5, args.warmup, args.recipe_rois
    )
    print(detector.guard_table(res))
    if not args.no_write:
        body = (
            "## The trainer's step: non-finite guard against detectron2's step\n\n"
            f"`python benchmarks/model.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
            f"({machine}; {load_note()}). Median ms per training step of the same model, optimizer "
            "and batch: detectron2's `SimpleTrainer.run_step` and d2norm's `guarded_run_step` (what "
            '`d2norm.engine.Trainer` runs), interleaved; "guard alone" times the guard\'s save and '
            "decision by themselves.\n\n" + detector.guard_table(res)
        )
        update_section(args.output, "guard", body, {"guard": res, "device": str(device)})
        print(f"wrote {args.output}")
    return res


def main(argv=None):
    args = parse_args(argv)
    device = setup_device(args)
    if args.guard:
        return guard_main(args, device, argv)
    size = tuple(args.size or ((128, 160) if args.quick else (256, 320)))
    n_img = args.images or (1 if args.quick else 2)
    reps = args.reps or (2 if args.quick else 3)
    norms = [n for n in detector.NORMS if n in args.norms]
    t_start = time.time()
    load_before = load_note()
    print(
        f"{machine_line(device)}; {n_img} image(s) of {size[0]}x{size[1]}; warm-up {args.warmup}; "
        f"median of {reps}; {load_before}"
    )

    inputs = detector.make_inputs(n_img, size, device)
    train, built = detector.measure_training(norms, device, inputs, args.warmup, reps, args.recipe_rois)
    for n, r in train.items():
        print(
            f"train {n:<9} {r['ms']:8.0f} ms  {r['time_ratio']:.2f}x   peak {r['peak'] / 2**20:7.0f} MB "
            f"{r['peak_ratio']:.2f}x"
        )
    if {"BN", "CBN", detector.CBN_FLOOR} <= set(train):
        bn_ms, floor_ms = train["BN"]["ms"], train[detector.CBN_FLOOR]["ms"]
        print(
            f"RATIO CBN / BN {train['CBN']['ms'] / bn_ms:.2f}x; CBN floor / BN {floor_ms / bn_ms:.2f}x; "
            f"CBN / CBN floor {train['CBN']['ms'] / floor_ms:.2f}x"
        )

    models = {n: built[n][0] for n in norms if n not in detector.TRAINING_ONLY}
    built.clear()  # the optimizers' state is not needed for inference
    inf_ms, fold_diff, fold_error = detector.measure_inference(models, inputs[0]["image"], size, reps, device)
    inference = detector.inference_ratios(inf_ms, list(models))
    for n, r in inference.items():
        extra = f" (max rel. feature diff {fold_diff[n[:-7]]:.1e})" if n.endswith(" folded") else ""
        print(f"infer {n:<16} {r['ms']:7.0f} ms {r['ratio']:.2f}x{extra}")
    wall = time.time() - t_start

    lines = detector.markdown_section(
        command_line(args, size, n_img),
        device,
        size,
        n_img,
        reps,
        args.warmup,
        args.recipe_rois,
        train,
        inf_ms,
        fold_diff,
        fold_error,
        wall,
        load_before,
    )
    if not args.no_write:
        update_section(
            args.output,
            "model",
            "\n".join(lines),
            {
                "train": train,
                "inference": inference,
                "size": f"{n_img}x{size[0]}x{size[1]}",
                "device": str(device),
            },
        )
        draw_chart(args.output, args.plot)
        print(f"wrote {args.output} and {args.plot} ({wall / 60:.1f} min)")
    return train, inference


if __name__ == "__main__":
    main()
