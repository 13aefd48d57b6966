#!/usr/bin/env python
"""Convert pretrained weights (torchvision, timm, Detectron / detectron2 .pkl, the official CBN
(mmdetection) and MABN (maskrcnn-benchmark) checkpoints) into the layout a recipe loads.

    python tools/convert_weights.py \\
        --config-file configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_contrib.yaml \\
        resnet50_gn.pth pretrained/R-50-GN-timm.pth
    python tools/convert_weights.py --config-file ... --source mmdet cbn_faster_rcnn.pth out.pth

The file is read with d2norm's loader, renamed to detectron2's names, loaded into the recipe's
model with every check of ``MODEL.WEIGHTS`` (a file whose backbone keys or shapes do not fit is
refused, naming the keys), and the recipe's input format (``INPUT.FORMAT``, ``MODEL.PIXEL_MEAN``,
``MODEL.PIXEL_STD``) is checked against the one the weights were trained with. The output holds
the loaded tensors under the model's names: point ``MODEL.WEIGHTS`` at it. docs/weights.md lists
what each recipe expects.
"""

import argparse
import os
import sys

import d2norm  # noqa: F401  (before detectron2.layers: the _C stand-in, norm names)
from d2norm.checkpoint import atomic_torch_save
from d2norm.convert import SOURCES, convert_weights


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config-file", required=True, help="the recipe the weights are for")
    p.add_argument("--source", default="auto", choices=("auto",) + SOURCES)
    p.add_argument(
        "--no-input-check", action="store_true", help="skip the input format check (channel order, mean, std)"
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
    state, info = convert_weights(cfg, args.input, source=args.source, check_input=not args.no_input_check)
    atomic_torch_save(
        {"model": state, "__author__": "d2norm convert_weights", "d2norm_convert": info}, args.output
    )
    skipped = f"; not converted: {len(info['not_converted'])} keys (e.g. {info['not_converted'][:3]})"
    print(
        f"{args.input} ({info['source']}): {info['loaded']} tensors written to {args.output}"
        f"{skipped if info['not_converted'] else ''}. Trained on input {info['input']}."
    )
    return info


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        sys.exit(f"convert_weights: {e}")
