#!/usr/bin/env python
"""Fold a trained model's norms into its convs, check the detections, trace it, save it.

    python tools/deploy.py --config-file configs/synthetic/mask_rcnn_R_18_FPN_CBN.yaml \\
        --output output/deploy/cbn MODEL.WEIGHTS output/synthetic/mask_rcnn_R_18_FPN_CBN/model_final.pth

Steps: build the model (``d2norm.build_model``), load ``MODEL.WEIGHTS`` with
``D2NormCheckpointer``, fold (``d2norm.deploy.fold``: WS / weight centralization baked; BN,
SyncBN, BN*, CBN and MABN folded into the preceding conv; GN kept), run the unfolded and the
folded model on the first ``--num-images`` images of ``DATASETS.TEST[0]`` and compare the
detections (boxes, scores, classes, masks; ``d2norm.detections.compare_detections``), trace the folded
model for TorchScript and / or export it to ONNX (``--format``), and time both. Written to
``--output`` (atomically):

* ``model_folded.pth``: ``{"model": folded state dict}``; load it with
  ``d2norm.deploy.load_folded_model(cfg, path)``.
* ``model_traced.ts``: ``torch.jit.trace`` of detectron2's ``TracingAdapter`` around
  ``model.inference(..., do_postprocess=False)``: input one image tensor (C, H, W) as produced by
  the test-time mapper (``INPUT.FORMAT``, already resized); outputs, in order: boxes (N, 4),
  classes (N,), mask probabilities (N, 1, M, M), scores (N,), image size (2,) — in the resized
  image's coordinates (``detector_postprocess`` / mask pasting are not traced). If a model's
  post-processing cannot be traced, the backbone (+FPN), the part folding changes, is traced
  instead and the report says so. Loading it needs torchvision's operators registered first
  (``import torchvision`` before ``torch.jit.load``: the traced graph calls ``torchvision::nms``
  and ``torchvision::roi_align``); nothing else (no detectron2, no d2norm).
* ``model.onnx`` (``--format onnx``): the same ``TracingAdapter`` graph exported to ONNX (opset
  17, height / width dynamic), run in onnxruntime on the checked images; its detections (after
  detectron2's ``detector_postprocess``) are compared with the eager folded model's under the
  same tolerances as the folding check.
* ``deploy_report.json``: what was folded / kept, the largest differences, the tolerances,
  per-image inference time before / after folding (median over ``--rounds`` passes).

Exit status 1 if the folded (or ONNX) detections differ beyond the tolerances.
"""

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time

import torch

import d2norm  # (before detectron2.layers: the _C stand-in, norm names)
from d2norm.detections import compare_detections

logger = logging.getLogger("d2norm.deploy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument(
        "--output", required=True, help="folder for the folded weights, the traced model and the report"
    )
    p.add_argument("--num-images", type=int, default=4, help="images of DATASETS.TEST[0] to check")
    p.add_argument("--rounds", type=int, default=3, help="timing passes over the images")
    p.add_argument(
        "--format",
        action="append",
        choices=["torchscript", "onnx"],
        help="export the folded model to this format; repeat for both (default: torchscript). "
        "onnx needs onnx + onnxruntime (scripts/install.sh installs them)",
    )
    p.add_argument("--no-trace", action="store_true", help="skip TorchScript tracing and ONNX export")
    p.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads for the timing (0: torch's default)"
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS x.pth")
    return p.parse_args(argv)


def setup(args):
    from d2norm.data import register_datasets
    from d2norm.engine.launch import setup as train_setup

    ns = argparse.Namespace(
        config_file=args.config_file, eval_only=True, opts=list(args.opts) + ["OUTPUT_DIR", args.output]
    )
    cfg = train_setup(ns)
    if not cfg.MODEL.WEIGHTS:
        raise SystemExit(
            "MODEL.WEIGHTS is empty: tools/deploy.py folds trained weights. Fix: "
            "append MODEL.WEIGHTS path/to/model_final.pth to the command line."
        )
    if not cfg.DATASETS.TEST:
        raise SystemExit(
            "DATASETS.TEST is empty: tools/deploy.py checks the folded model on its "
            "first images. Fix: set DATASETS.TEST, e.g. \"('d2norm_shapes_val',)\"."
        )
    register_datasets(cfg)
    return cfg


def load_model(cfg):
    from d2norm.checkpoint import D2NormCheckpointer

    model = d2norm.build_model(cfg)
    D2NormCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def load_inputs(cfg, n):
    from d2norm.engine.guards import check_datasets

    from detectron2.data import DatasetCatalog, DatasetMapper

    name = cfg.DATASETS.TEST[0]
    check_datasets([name], "DATASETS.TEST")
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get(name)[:n]]


@torch.no_grad()
def run(model, inputs):
    return [model([inp])[0]["instances"].to("cpu") for inp in inputs]


@torch.no_grad()
def time_per_image(fn, inputs, rounds):
    """Median seconds per image of ``fn(input)`` over ``rounds`` passes (after one warm-up)."""
    fn(inputs[0])
    times = []
    for _ in range(rounds):
        for inp in inputs:
            t0 = time.perf_counter()
            fn(inp)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def trace(model, inputs):
    """TorchScript of the folded model's inference (falls back to the backbone + FPN).

    Returns ``(script_module, run, eager, what)``: ``run(image)`` / ``eager(image)`` give the
    traced / eager outputs as a tuple of tensors for one mapped image tensor."""
    from d2norm.deploy import import_tracing_adapter

    TracingAdapter = import_tracing_adapter()

    def inference(m, batched):
        return [{"instances": m.inference(batched, do_postprocess=False)[0]}]

    image = inputs[0]["image"]
    try:
        adapter = TracingAdapter(model, [{"image": image}], inference)
        with torch.no_grad():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        what = (
            "whole model: Mask R-CNN inference without detector_postprocess "
            "(TracingAdapter); outputs: boxes, classes, mask probabilities, scores, image size"
        )
        return traced, traced, adapter, what
    except Exception as e:  # a meta-architecture whose post-processing does not trace
        logger.warning(
            "Tracing the whole model failed (%s: %s); tracing the backbone instead.", type(e).__name__, e
        )
    backbone = model.backbone

    def to_tensor(img):
        return model.preprocess_image([{"image": img}]).tensor

    def as_tuple(out):
        return tuple(out[k] for k in sorted(out)) if isinstance(out, dict) else out

    with torch.no_grad():
        traced = torch.jit.trace(backbone, (to_tensor(image),), strict=False, check_trace=False)
    what = "backbone + FPN only (the part folding changes); input: normalized, padded image"
    return (
        traced,
        lambda img: as_tuple(traced(to_tensor(img))),
        lambda img: as_tuple(backbone(to_tensor(img))),
        what,
    )


def _adapter(model, image):
    from d2norm.deploy import import_tracing_adapter

    def inference(m, batched):
        return [{"instances": m.inference(batched, do_postprocess=False)[0]}]

    return import_tracing_adapter()(model, [{"image": image}], inference).eval()


def export_onnx(model, inputs, path):
    """Export the folded model's inference (``TracingAdapter``, as for TorchScript) to ONNX at
    ``path``; returns the adapter (its ``outputs_schema`` rebuilds ``Instances``)."""
    from d2norm.checkpoint import atomic_write_bytes

    adapter = _adapter(model, inputs[0]["image"])
    with torch.no_grad():
        atomic_write_bytes(
            path,
            lambda f: torch.onnx.export(
                adapter,
                adapter.flattened_inputs,
                f,
                opset_version=17,
                dynamo=False,  # the TorchScript-based exporter: detectron2's tracing support
                input_names=["image"],
                output_names=["boxes", "classes", "mask_probs", "scores", "image_size"],
                dynamic_axes={"image": {1: "height", 2: "width"}},
                # every parameter its own graph input with its value as default: without this the
                # exporter merges equal-valued parameters (e.g. untrained FRN γ = 1, τ = 0) into
                # names that no longer exist in the file
                keep_initializers_as_inputs=True,
            ),
        )
    return adapter


def check_onnx(path, adapter, model, inputs):
    """Run the ONNX file in onnxruntime on ``inputs`` and compare its detections with the eager
    model's (``d2norm.detections.compare_detections``, after ``detector_postprocess`` of both).
    Returns the comparison, the largest raw output difference and onnxruntime's time per image."""
    import onnxruntime

    from detectron2.modeling.postprocessing import detector_postprocess

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ref, new, raw_diff = [], [], 0.0
    for inp in inputs:
        h, w = inp.get("height", inp["image"].shape[1]), inp.get("width", inp["image"].shape[2])
        outs = [torch.from_numpy(o) for o in session.run(None, {name: inp["image"].numpy()})]
        with torch.no_grad():
            eager = adapter(inp["image"])
            raw = model.inference([{"image": inp["image"]}], do_postprocess=False)[0]
        raw_diff = max(raw_diff, _max_output_diff(lambda _, o=outs: tuple(o), lambda _, e=eager: e, None))
        onnx_instances = adapter.outputs_schema(outs)[0]["instances"]
        ref.append(detector_postprocess(raw, h, w).to("cpu"))
        new.append(detector_postprocess(onnx_instances, h, w).to("cpu"))
    seconds = time_per_image(lambda x: session.run(None, {name: x["image"].numpy()}), inputs, 1)
    return compare_detections(ref, new), raw_diff, seconds


def _max_output_diff(traced, eager, img):
    with torch.no_grad():
        a, b = traced(img), eager(img)
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def main(argv=None):
    from d2norm.checkpoint import atomic_torch_save, atomic_write_bytes
    from d2norm.deploy import fold

    args = parse_args(argv)
    args.format = args.format or ["torchscript"]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = setup(args)
    os.makedirs(args.output, exist_ok=True)
    inputs = load_inputs(cfg, args.num_images)
    if not inputs:
        raise SystemExit(
            f"DATASETS.TEST[0] ({cfg.DATASETS.TEST[0]!r}) has no images. Fix: use a dataset with images."
        )

    reference = load_model(cfg)
    folded = fold(load_model(cfg))
    report = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "images": len(inputs),
        "device": cfg.MODEL.DEVICE,
        "torch_threads": torch.get_num_threads(),
        "folded_layers": len(folded.fold_report["folded"]),
        "kept_layers": folded.fold_report["kept"],
        "folded_norm_types": sorted({t for _, t in folded.fold_report["folded"]}),
    }

    report["detections"] = compare_detections(run(reference, inputs), run(folded, inputs))
    t_ref = time_per_image(lambda x: reference([x]), inputs, args.rounds)
    t_fold = time_per_image(lambda x: folded([x]), inputs, args.rounds)
    report["seconds_per_image"] = {"unfolded": t_ref, "folded": t_fold}

    if not args.no_trace and "onnx" in args.format:
        path = os.path.join(args.output, "model.onnx")
        adapter = export_onnx(folded, inputs, path)
        onnx_det, raw_diff, t_onnx = check_onnx(path, adapter, folded, inputs)
        report["onnx"] = {
            "file": path,
            "opset": 17,
            "detections_vs_eager": onnx_det,
            "max_abs_output_diff_vs_eager": raw_diff,
        }
        report["seconds_per_image"]["onnxruntime"] = t_onnx

    if not args.no_trace and "torchscript" in args.format:
        module, traced, eager, what = trace(folded, inputs)
        path = os.path.join(args.output, "model_traced.ts")
        atomic_write_bytes(path, lambda f: torch.jit.save(module, f))
        check_img = inputs[min(1, len(inputs) - 1)]["image"]
        report["trace"] = {
            "file": path,
            "what": what,
            "max_abs_diff_vs_eager": _max_output_diff(traced, eager, check_img),
            # torchvision registers the nms / roi_align operators the graph calls
            "load": "import torch, torchvision; torch.jit.load(path)",
        }
        report["seconds_per_image"]["traced"] = time_per_image(
            lambda x: traced(x["image"]), inputs, args.rounds
        )

    weights = os.path.join(args.output, "model_folded.pth")
    atomic_torch_save({"model": folded.state_dict(), "d2norm_folded": True}, weights)
    report["folded_weights"] = weights
    atomic_write_bytes(
        os.path.join(args.output, "deploy_report.json"),
        lambda f: f.write(json.dumps(report, indent=2, default=str).encode()),
    )

    det, t = report["detections"], report["seconds_per_image"]
    traced_ms = f", traced {1e3 * t['traced']:.1f} ms" if "traced" in t else ""
    if "onnx" in report:
        od = report["onnx"]["detections_vs_eager"]
        traced_ms += (
            f", onnxruntime {1e3 * t['onnxruntime']:.1f} ms (ONNX detections "
            f"{'MATCH' if od['ok'] else 'DIFFER'}: max |dbox| {od['max_diff']['box_px']:.2g} px, "
            f"|dscore| {od['max_diff']['score']:.2g})"
        )
    print(
        f"Folded {report['folded_layers']} norm layers "
        f"({', '.join(report['folded_norm_types']) or '-'}), kept {len(report['kept_layers'])}. "
        f"Detections {'MATCH' if det['ok'] else 'DIFFER'}: max |dbox| "
        f"{det['max_diff']['box_px']:.2g} px, |dscore| {det['max_diff']['score']:.2g}, mask pixels "
        f"differing {det['max_diff']['mask_pixel_fraction']:.2g} (tolerances {det['tolerance']}). "
        f"Per image: unfolded {1e3 * t['unfolded']:.1f} ms, folded {1e3 * t['folded']:.1f} ms"
        f"{traced_ms}. Written to {args.output}."
    )
    return report


if __name__ == "__main__":
    _report = main()
    _ok = (
        _report["detections"]["ok"] and _report.get("onnx", {}).get("detections_vs_eager", {"ok": True})["ok"]
    )
    sys.exit(0 if _ok else 1)
