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

from d2norm.study import FULL, QUICK, StudySettings, load_records, plan, settings_id
from d2norm.study.records import run_key
from d2norm.study.report import machine_line, write_plot_or_note, write_report
from d2norm.study.run import run_from_args
from d2norm.study.settings import schedule, settings_from_args

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
        "--tail-evals",
        type=int,
        default=d.tail_evals,
        help="evaluate the last K checkpoints (every iters // 30 iterations) of every run; AP is "
        f"also reported averaged over them (default {d.tail_evals})",
    )
    p.add_argument(
        "--precise-images",
        type=int,
        default=d.precise_images,
        help="training images over which running statistics are re-estimated for the second "
        f"evaluation of BN / SyncBN / CBN / MABN / BRN models (default {d.precise_images})",
    )
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
    args.settings = settings_from_args(
        p,
        StudySettings,
        args,
        preset,
        config=args.config,
        tail_evals=args.tail_evals,
        precise_images=args.precise_images,
        **kw,
    )
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


def _runs_line(records):
    """What the records hold: per norm, the images per process and the seeds (measured, not planned)."""
    by_norm = {}
    for r in records:
        by_norm.setdefault(r["norm"], {}).setdefault(int(r["per_proc"]), set()).add(int(r["seed"]))
    parts = []
    for norm, pts in sorted(by_norm.items()):
        cells = ", ".join(
            f"b={b}: {len(seeds)} seed(s) ({_ranges(sorted(seeds))})" for b, seeds in sorted(pts.items())
        )
        parts.append(f"{norm} ({cells})")
    return "; ".join(parts)


def _ranges(xs):
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}–{x}")
            start = None
    return ", ".join(out)


def settings_text(s, records=()):
    steps, warmup = schedule(s)
    bs = ", ".join(f"{s.per_proc(p)} (P={p})" for p in s.procs)
    return "\n".join(
        [
            f"* Runs recorded: {_runs_line(records)} (seed = weight initialization and image order)."
            if records
            else "",
            f"* This invocation's grid: norms {', '.join(s.norms)}; images per process {bs}; "
            f"seeds {', '.join(map(str, s.seeds))}"
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
            "(the one detectron2 saves), evaluated in one process; from the decision grid on, every "
            f"model is also evaluated at its last {s.tail_evals} checkpoints "
            f"({', '.join(map(str, s.tail_iters()))}), "
            f"with statistics re-estimated over {s.precise_images} training images where it has "
            "running statistics, and with the val loss.",
            f"* {s.threads} torch thread(s) per process.",
        ]
    )


def _study_records(args):
    """Every record of ``<output>/results.jsonl`` made with these settings (any norm, P or seed)."""
    sid = settings_id(args.settings)
    return [r for r in load_records(os.path.join(args.output, "results.jsonl"))[0] if r["settings_id"] == sid]


def report(args, records, wall_s=None):
    s = args.settings
    planned = plan(s)
    done = {run_key(r) for r in records}
    records = _study_records(args) or records
    quick = " (quick mode)" if args.quick else ""
    header = [f"# Small-batch study{quick}", ""]
    if args.header and os.path.isfile(args.header):
        with open(args.header, encoding="utf-8") as f:
            header += [f.read().strip(), ""]
    header.append(
        f"{len(records)} runs recorded; of the last invocation's grid, "
        f"{sum(run_key(p) in done for p in planned)} of {len(planned)}."
    )
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
        args.report,
        records,
        "\n".join(header),
        settings_text(s, records),
        "\n".join(footer),
        s.total_batch,
        plot_rel,
    )
    title = f"{s.iters} iterations, {s.total_batch} images per iteration; mean ± std over seeds"
    write_plot_or_note(args.plot, records, s.total_batch, title)


def main(argv=None):
    args = parse_args(argv)
    s = args.settings
    return run_from_args(s, args, report)


if __name__ == "__main__":
    main()
