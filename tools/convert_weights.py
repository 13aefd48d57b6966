#!/usr/bin/env python
"""Convert pretrained weights (torchvision, timm, Detectron / detectron2 .pkl, the official CBN
(mmdetection) and MABN (maskrcnn-benchmark) checkpoints) into the layout a recipe loads.

    python tools/convert_weights.py \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_contrib.yaml \\
        resnet50_gn.pth pretrained/R-50-GN-timm.pth
    python tools/convert_weights.py --config-file ... --source mmdet cbn_faster_rcnn.pth out.pth
    python tools/convert_weights.py --match-source \
        --config-file COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn.yaml cbn_mask_rcnn.pth out.pth

The file is read with d2norm's loader, renamed to detectron2's names, loaded into the recipe's
model with every check of ``MODEL.WEIGHTS`` (a file whose backbone keys or shapes do not fit is
refused, naming the keys), and the recipe's input format (``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN``,
``MODEL.PIXEL_STD``) is checked against the one the weights were trained with. Whole detectors
of the official CBN / MABN checkpoints (FPN, RPN, box and mask heads) are converted too where
the recipe builds the same architecture (``--parts`` to choose); the recipe must then compute
them as the source did (anchor offset, ROIAlign, box encodings): ``--match-source`` sets those
keys, and the output records them. The output holds the loaded tensors under the model's names:
point ``MODEL.WEIGHTS`` at it. docs/weights.md lists what each recipe expects.
"""

import argparse
import os
import sys

import d2norm  # noqa: F401  (before detectron2.layers: the _C stand-in, norm names)
from d2norm.checkpoint import atomic_torch_save
from d2norm.convert import PARTS, SOURCES, convert_weights
from d2norm.convert_detector import source_settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the recipe the weights are for")
    p.add_argument("--source", default="auto", choices=("auto",) + SOURCES)
    p.add_argument(
        "--no-input-check", action="store_true", help="skip the input format check (channel order, mean, std)"
    )
    p.add_argument(
        "--parts",
        default=None,
        help=f"comma-separated subset of {','.join(PARTS)} (default: every part the file holds)",
    )
    p.add_argument(
        "--match-source",
        action="store_true",
        help="set the recipe's anchor, box-encoding and ROIAlign keys to the source's (whole detectors)",
    )
    p.add_argument(
        "--no-settings-check",
        action="store_true",
        help="convert detector parts even where the recipe computes them otherwise than the source",
    )
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return p.parse_args(argv)


def main(argv=None):
    from d2norm import model_zoo

    from detectron2.config import get_cfg

    args = parse_args(argv)
    # a file, or a recipe name of d2norm.model_zoo (e.g. "synthetic/mask_rcnn_R_18_FPN_GN.yaml")
    path = (
        args.config_file if os.path.isfile(args.config_file) else model_zoo.get_config_file(args.config_file)
    )
    cfg = get_cfg()
    d2norm.add_d2norm_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(args.opts)
    parts = None if args.parts is None else args.parts.split(",")
    if args.match_source:
        cfg.merge_from_list([str(x) for kv in source_settings(parts or PARTS) for x in kv])
    state, info = convert_weights(
        cfg,
        args.input,
        source=args.source,
        check_input=not args.no_input_check,
        parts=parts,
        check_settings=not args.no_settings_check,
    )
    atomic_torch_save(
        {"model": state, "__author__": "d2norm convert_weights", "d2norm_convert": info}, args.output
    )
    skipped = f"; not converted: {len(info['not_converted'])} keys (e.g. {info['not_converted'][:3]})"
    print(
        f"{args.input} ({info['source']}): {', '.join(info['parts'])}: {info['loaded']} tensors "
        f"written to {args.output}{skipped if info['not_converted'] else ''}. Trained on input "
        f"{info['input']}."
    )
    if info["settings"]:
        overrides = " ".join(f"{k} {_arg(v)}" for k, v in info["settings"])
        print(f"Evaluate the converted detector with the source's settings: {overrides}")
    for note in info["approximations"]:
        print(f"Not reproduced exactly: {note}.")
    return info


def _arg(value):
    text = str(list(value)) if isinstance(value, (list, tuple)) else str(value)
    return f'"{text}"' if " " in text else text


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        sys.exit(f"convert_weights: {e}")
