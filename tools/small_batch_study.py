#!/usr/bin/env python
"""The small-batch study: box AP against images per process, every norm, at a fixed total batch.

    python3 tools/small_batch_study.py --output OUT --jobs 16              # the full grid
    python3 tools/small_batch_study.py --output OUT --jobs 16 --resume     # continue it
    python3 tools/small_batch_study.py --quick --output OUT                # a bounded subset
    python3 tools/small_batch_study.py --output OUT --report-only          # redraw table / plot

Every run trains 8 images per iteration (same LR, schedule and images at every point) split over
P gloo processes (P = 8, 4, 1 by default: 1, 2, 8 images per process), evaluates box AP on the
hard synthetic split, and is appended to OUT/results.jsonl. OUT/small_batch_study.md and .png are
rewritten after every run. The library is ``d2norm.study``; see docs/small_batch_study.md.
"""

import argparse
import os
import shlex
import sys

from d2norm.study import FULL, QUICK, StudySettings, plan
from d2norm.study.report import machine_line, write_plot_or_note, write_report
from d2norm.study.run import run_from_args
from d2norm.study.settings import schedule

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "synthetic",
    "study",
    "Base-Study.yaml",
)


def parse_args(argv=None):
    d = StudySettings(config="")
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a bounded subset: norms {' '.join(QUICK['norms'])}, P {QUICK['procs']}, seeds "
        f"{QUICK['seeds']}, {QUICK['iters']} iterations, 50 val images (explicit flags win)",
    )
    p.add_argument(
        "--norms",
        nargs="+",
        default=None,
        help=f"default: {' '.join(d.norms)} (any name this d2norm can build)",
    )
    p.add_argument(
        "--procs",
        nargs="+",
        type=int,
        default=None,
        help=f"processes per run P (b = total batch / P); default: {' '.join(map(str, d.procs))}",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=None, help=f"default: {' '.join(map(str, d.seeds))}"
    )
    p.add_argument("--iters", type=int, default=None, help=f"iterations per run (default {d.iters})")
    p.add_argument("--total-batch", type=int, default=d.total_batch, help="images per iteration")
    p.add_argument(
        "--curve-fracs",
        nargs="*",
        type=float,
        default=None,
        help="extra evaluations of the first seed's runs at these fractions of the schedule "
        f"(default: {' '.join(map(str, d.curve_fracs))}); e.g. 0.25 0.5 0.75 to calibrate",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training processes at once (a run with P processes takes min(P, jobs)); "
        "use the number of cores",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument(
        "--output",
        default=os.path.join("output", "small_batch_study"),
        help="folder for results.jsonl, the report, the plot and the per-run folders",
    )
    p.add_argument("--report", default=None, help="Markdown report (default <output>/small_batch_study.md)")
    p.add_argument("--plot", default=None, help="PNG plot (default <output>/small_batch_study.png)")
    p.add_argument(
        "--header", default=None, help="a Markdown file placed at the top of the report (findings)"
    )
    p.add_argument("--resume", action="store_true", help="skip the runs already in <output>/results.jsonl")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report / plot")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="the study's base config")
    p.add_argument("--data-root", default="", help="synthetic dataset folder (default: D2NORM.DATA.ROOT)")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's folder (logs, models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides for every run, KEY VALUE pairs after all flags; the batch, "
        "schedule, norm and per-norm rules are then set by the study",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = QUICK if args.quick else FULL
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    kw = {k: v for k, v in preset.items() if k != "opts"}
    if args.seeds:
        kw["curve_seeds"] = (args.seeds[0],)
    for name in ("norms", "procs", "seeds", "iters", "curve_fracs"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        args.settings = StudySettings(
            config=args.config,
            total_batch=args.total_batch,
            threads=args.threads,
            opts=tuple(preset.get("opts", ())) + tuple(args.opts),
            data_root=args.data_root,
            **kw,
        )
    except ValueError as e:
        p.error(str(e))
    args.report = args.report or os.path.join(args.output, "small_batch_study.md")
    args.plot = args.plot or os.path.join(args.output, "small_batch_study.png")
    return args


def _display_command(args):
    skip_next, out = False, []
    for a in args.argv:
        if skip_next:
            skip_next = False
            continue
        if a in ("--resume", "--report-only", "--no-progress", "--keep-outputs"):
            continue
        if a == "--header":
            skip_next = True
            continue
        out.append(shlex.quote(a))
    return "python3 tools/small_batch_study.py " + " ".join(out)


def settings_text(s):
    steps, warmup = schedule(s)
    bs = ", ".join(f"{s.per_proc(p)} (P={p})" for p in s.procs)
    return "\n".join(
        [
            f"* Runs: norms {', '.join(s.norms)}; images per process {bs}; "
            f"seeds {', '.join(map(str, s.seeds))} "
            "(seed = weight initialization and image order)"
            + (
                "; SyncBN at P=1 is not run (it is BN at 8 images, exactly)"
                if s.skip_redundant and 1 in s.procs and "SyncBN" in s.norms
                else ""
            )
            + ".",
            f"* Every point: {s.total_batch} images per iteration (DDP averages the P processes' gradients), "
            f"{s.iters} iterations, the config's BASE_LR, "
            f"LR ×0.1 at iterations {', '.join(map(str, steps))}, "
            f"linear warm-up {warmup} iterations.",
            f"* CBN: window = {s.simulated_batch} / b iterations (current one included), burn-in {warmup}. "
            f"MABN: buffer = {s.simulated_batch} / b, warm-up {warmup} (its renorm clamp starts after "
            "iteration max(1000, warm-up), as in the official code).",
            f"* Model and data: `{os.path.relpath(s.config)}`"
            + (f" with `{' '.join(s.opts)}`" if s.opts else "")
            + "; box AP of rank 0's model "
            "(the one detectron2 saves), evaluated in one process.",
            f"* {s.threads} torch thread(s) per process.",
        ]
    )


def report(args, records, wall_s=None):
    s = args.settings
    planned = plan(s)
    quick = " (quick mode)" if args.quick else ""
    header = [f"# Small-batch study{quick}", ""]
    if args.header and os.path.isfile(args.header):
        with open(args.header, encoding="utf-8") as f:
            header += [f.read().strip(), ""]
    header.append(f"{len(records)} of {len(planned)} planned runs recorded.")
    footer = [
        "## Reproduce",
        "",
        f"```bash\n{_display_command(args)}\n```",
        "",
        f"Machine: {machine_line()}."
        + (f" Wall time of the last invocation: {wall_s / 60:.1f} min." if wall_s else ""),
        "",
        f"Raw records: `{os.path.basename(os.path.join(args.output, 'results.jsonl'))}` (one JSON "
        "object per run); an interrupted study continues with `--resume`.",
    ]
    plot_rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.report)))
    write_report(
        args.report, records, "\n".join(header), settings_text(s), "\n".join(footer), s.total_batch, plot_rel
    )
    title = f"{s.iters} iterations, {s.total_batch} images per iteration; mean ± std over seeds"
    write_plot_or_note(args.plot, records, s.total_batch, title)


def main(argv=None):
    args = parse_args(argv)
    s = args.settings
    records, failed = run_from_args(s, args, report)
    print(f"wrote {args.report} and {args.plot} from {len(records)} record(s)")
    if failed:
        sys.exit(1)
    return records


if __name__ == "__main__":
    main()
