#!/usr/bin/env python
"""Plot training-loss curves of several runs from their detectron2 ``metrics.json``.

    python tools/plot_loss_curves.py --runs "BN=output/bn" "CBN=output/cbn" \
        --keys total_loss loss_mask --output curves.png [--mark 100 "burn-in ends"]

Each ``--runs`` entry is ``LABEL=OUTPUT_DIR``; one panel per ``--keys`` entry, loss vs iteration
(the values detectron2 writes every 20 iterations: the median of the last 20). ``--table`` also
prints, for each run, the mean of each key over the last ``--last`` logged points.
"""

import argparse
import json
import os


def read_metrics(output_dir):
    """{key: [(iteration, value), ...]} from ``output_dir/metrics.json`` (training rows only)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No metrics.json in {output_dir!r}: pass the OUTPUT_DIR of a training run.")
    series = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if "iteration" not in row or "total_loss" not in row:
                continue
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    series.setdefault(key, []).append((row["iteration"], float(value)))
    return series


def tail_mean(points, last):
    values = [v for _, v in points[-last:]]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", required=True, help="LABEL=OUTPUT_DIR entries")
    parser.add_argument("--keys", nargs="+", default=["total_loss", "loss_mask"])
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--mark", nargs=2, metavar=("ITER", "LABEL"), help="a vertical line")
    parser.add_argument("--last", type=int, default=5, help="points averaged by --table")
    parser.add_argument("--table", action="store_true", help="print the tail means as markdown")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for entry in args.runs:
        if "=" not in entry:
            parser.error(f"--runs entry {entry!r} must be LABEL=OUTPUT_DIR")
        label, path = entry.split("=", 1)
        runs.append((label, read_metrics(path)))
    fig, axes = plt.subplots(1, len(args.keys), figsize=(5.5 * len(args.keys), 4), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for label, series in runs:
            pts = series.get(key, [])
            ax.plot([i for i, _ in pts], [v for _, v in pts], label=label)
        if args.mark:
            ax.axvline(int(args.mark[0]), color="gray", linestyle="--", linewidth=1)
            ax.text(
                int(args.mark[0]), ax.get_ylim()[1], " " + args.mark[1], va="top", fontsize=8, color="gray"
            )
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    if args.table:
        print("| run | " + " | ".join(f"{k} (last {args.last} logs)" for k in args.keys) + " |")
        print("|---|" + "---|" * len(args.keys))
        for label, series in runs:
            print(
                f"| {label} | "
                + " | ".join(f"{tail_mean(series.get(k, []), args.last):.3f}" for k in args.keys)
                + " |"
            )


if __name__ == "__main__":
    main()
