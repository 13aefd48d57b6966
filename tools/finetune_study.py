#!/usr/bin/env python
"""The fine-tuning study: each norm where the COCO recipes put it, fine-tuned from a pretrained backbone.

    python3 tools/finetune_study.py --output OUT --jobs 2                # the grid (resumable)
    python3 tools/finetune_study.py --output OUT --jobs 2 --resume       # continue it
    python3 tools/finetune_study.py --quick --output OUT                 # the machinery, < 5 min
    python3 tools/finetune_study.py --output OUT --report-only           # redraw table / plot
    python3 tools/finetune_study.py --output OUT --plan                  # list the runs and stop

Each arm is a synthetic twin of a COCO recipe (configs/synthetic/finetune/) fine-tuned from its
pretrained backbone (tools/pretrain_backbone.py; pretrained here first if the cache lacks it) at
8 images per iteration, in P = 1 process (8 images per process) or 4 (2 per process). Each run is
appended to OUT/results.jsonl; OUT/finetune_study.md and .png are rewritten after every run.
The library is ``d2norm.study`` (``finetune``, ``pretrain``, ``finetune_report``); see
docs/finetune_study.md.
"""

import argparse
import os
import shlex
import sys

from d2norm.study.finetune import ARMS, FINETUNE_FULL, FINETUNE_QUICK, FinetuneSettings
from d2norm.study.finetune_report import write_finetune_report
from d2norm.study.pretrain import load_or_pretrain
from d2norm.study.report import machine_line, write_plot_or_note
from d2norm.study.run import run_from_args
from d2norm.study.settings import settings_from_args


def parse_args(argv=None):
    d = FinetuneSettings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--quick", action="store_true", help="arms BN*, BN, SyncBN; P 1, 2; seed 0; 20 iterations")
    p.add_argument("--arms", nargs="+", default=None, help=f"default: {' | '.join(d.norms)}")
    p.add_argument("--procs", nargs="+", type=int, default=None, help=f"default: {d.procs}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default: {d.seeds}")
    p.add_argument("--iters", type=int, default=None, help=f"iterations per run (default {d.iters})")
    p.add_argument("--total-batch", type=int, default=d.total_batch, help="images per iteration")
    p.add_argument("--jobs", type=int, default=1, help="training processes at once (use the cores)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--output", default=os.path.join("output", "finetune_study"))
    p.add_argument("--header", default=None, help="Markdown placed at the top of the report")
    p.add_argument("--report", default=None, help="default <output>/finetune_study.md")
    p.add_argument("--plot", default=None, help="default <output>/finetune_study.png")
    p.add_argument("--resume", action="store_true", help="skip the runs already in <output>/results.jsonl")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--plan", action="store_true", help="print the planned runs and stop")
    p.add_argument(
        "--data-root", default="", help="datasets and pretrained backbones (default: the data root)"
    )
    p.add_argument("--pretrain-iters", type=int, default=None, help="pretraining iterations (default 1500)")
    p.add_argument("--pretrain-batch", type=int, default=None, help="pretraining batch (default 64)")
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run (KEY VALUE ...)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = FINETUNE_QUICK if args.quick else FINETUNE_FULL
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    kw = {k: v for k, v in preset.items() if k != "opts"}
    for name, key in (("arms", "norms"), ("procs", "procs"), ("seeds", "seeds"), ("iters", "iters")):
        if getattr(args, name) is not None:
            kw[key] = getattr(args, name)
    if args.seeds:
        kw["curve_seeds"] = (args.seeds[0],)
    pre = dict(kw.get("pretrain", FinetuneSettings.pretrain))
    for name in ("iters", "batch"):
        if getattr(args, f"pretrain_{name}") is not None:
            pre[name] = getattr(args, f"pretrain_{name}")
    kw["pretrain"] = tuple(sorted(pre.items()))
    args.settings = settings_from_args(p, FinetuneSettings, args, preset, **kw)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    args.report = args.report or os.path.join(args.output, "finetune_study.md")
    args.plot = args.plot or os.path.join(args.output, "finetune_study.png")
    return args


def with_weights(s, progress=True):
    """``s`` with the pretrained file of every variant its arms load (pretrained first if needed)."""
    import dataclasses

    weights = []
    for variant in s.variants():
        path, info = load_or_pretrain(s.pretrain_settings(variant), progress=progress)
        print(f"pretrained {variant}: {path} (upstream top-1 {info['upstream_top1']:.3f})")
        weights.append((variant, path))
    return dataclasses.replace(s, weights=tuple(weights))


def settings_text(s):
    pre = dict(s.pretrain)
    cfg = s.arm_cfg_unweighted(s.norms[0])
    bs = ", ".join(str(s.per_proc(p)) for p in s.procs)
    return "\n".join(
        [
            f"* Arms: {', '.join(s.norms)} (twins and weights: `d2norm.study.finetune.ARMS`); "
            f"processes P = {', '.join(map(str, s.procs))} (b = {bs} images per process); seeds "
            f"{', '.join(map(str, s.seeds))}. SyncBN at P = 1 is BN at 8 images and is not run; "
            "the positive control (BN* random) runs at P = 1 only.",
            f"* Every point: {s.total_batch} images per iteration, {s.iters} iterations, BASE_LR "
            f"{cfg.SOLVER.BASE_LR}, LR ×0.1 at {tuple(cfg.SOLVER.STEPS)}, {cfg.SOLVER.WARMUP_ITERS} "
            "warm-up iterations (the twins' schedule).",
            f"* Pretraining: {pre['iters']} iterations × {pre['batch']} upstream images, "
            f"peak LR {pre['lr']}.",
            "* Evaluation: box AP of rank 0's saved model on the hard val split in one process, "
            "and the same with re-estimated BN statistics.",
            f"* {s.threads} torch thread(s) per process.",
        ]
    )


def _command(args):
    keep = [a for a in args.argv if a not in ("--resume", "--report-only", "--no-progress", "--keep-outputs")]
    return "python3 tools/finetune_study.py " + " ".join(shlex.quote(a) for a in keep)


def report(args, records, wall_s=None):
    s = args.settings
    planned = s.plan()
    header = [f"# Fine-tuning study{' (quick mode)' if args.quick else ''}", ""]
    if args.header and os.path.isfile(args.header):
        with open(args.header, encoding="utf-8") as f:
            header += [f.read().strip(), ""]
    header.append(f"{len(records)} of {len(planned)} planned runs recorded.")
    footer = [
        "## Reproduce",
        "",
        f"```bash\n{_command(args)}\n```",
        "",
        f"Machine: {machine_line()}."
        + (f" Wall time of the last invocation: {wall_s / 60:.1f} min." if wall_s else ""),
    ]
    plot_rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.report)))
    write_finetune_report(
        args.report, records, "\n".join(header), settings_text(s), "\n".join(footer), s.total_batch, plot_rel
    )
    title = f"fine-tuned, {s.iters} iterations, {s.total_batch} images per iteration; mean ± std"
    write_plot_or_note(args.plot, records, s.total_batch, title)


def main(argv=None):
    args = parse_args(argv)
    s = args.settings
    if args.plan:
        for spec in s.plan():
            twin = ARMS[spec["norm"]][0]
            print(f"{spec['norm']:12s} P={spec['procs']} b={spec['per_proc']} seed={spec['seed']} ({twin})")
        return []
    if not args.report_only:
        s = args.settings = with_weights(s, progress=not args.no_progress)
    return run_from_args(s, args, report)


if __name__ == "__main__":
    main()
