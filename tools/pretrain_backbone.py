#!/usr/bin/env python
"""Pretrain the fine-tuning study's backbone on the upstream task (64 shape/fill/colour classes).

    python3 tools/pretrain_backbone.py --variant BN               # cached under the data root
    python3 tools/pretrain_backbone.py --variant BN GN GN+WS MABN BCN+WS  # all five, one after the other
    python3 tools/pretrain_backbone.py --variant BN --iters 30 --output /tmp/bn.pth   # a timed try

Each variant trains the backbone of its fine-tuning config (``--config``; default: the twin that
loads it, ``configs/synthetic/finetune/``) with that variant's norm at a large batch, then writes
a torchvision-style ResNet state dict (loaded through ``MODEL.WEIGHTS`` like the COCO recipes'
real files) and a JSON beside it (settings, upstream top-1, cost). A file already in the cache
(same settings) is reused. The library is ``d2norm.study.pretrain``; see docs/finetune_study.md.
"""

import argparse
import os

from d2norm.study.finetune import PRETRAIN_DEFAULTS, variant_config
from d2norm.study.pretrain import VARIANTS, PretrainSettings, checkpoint_path, load_or_pretrain, pretrain


def parse_args(argv=None):
    d = PretrainSettings(variant="BN", config="", **PRETRAIN_DEFAULTS)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--variant", nargs="+", required=True, choices=sorted(VARIANTS))
    p.add_argument("--config", default=None, help="the fine-tuning config (default: the variant's twin)")
    p.add_argument("--iters", type=int, default=d.iters, help=f"iterations (default {d.iters})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per iteration (default {d.batch})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--data-root", default="", help="cache root (default: D2NORM.DATA.ROOT / $D2NORM_DATA)")
    p.add_argument("--output", default=None, help="write here instead of the cache (one variant)")
    p.add_argument("--force", action="store_true", help="pretrain again even if the cache has the file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.output and len(args.variant) > 1:
        p.error("--output takes one --variant")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = []
    for variant in args.variant:
        s = PretrainSettings(
            variant=variant,
            config=args.config or variant_config(variant),
            iters=args.iters,
            batch=args.batch,
            lr=args.lr,
            threads=args.threads,
            data_root=args.data_root,
        )
        if args.output or args.force:
            path, info = pretrain(s, args.output or checkpoint_path(s), progress=not args.no_progress)
        else:
            path, info = load_or_pretrain(s, progress=not args.no_progress)
        print(
            f"{variant}: {path} (upstream top-1 {info['upstream_top1']:.3f}, "
            f"{info['train_cpu_s'] / 60:.1f} CPU min)"
        )
        out.append((path, info))
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
