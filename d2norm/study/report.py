"""The study's report: Markdown tables (AP, paired differences, convergence, cost) and the plot."""

import os
import platform
import statistics

from ..checkpoint import atomic_write_bytes
from .records import latest_records
from .stats import aggregate, convergence, paired_difference, point_values

__all__ = [
    "norm_order",
    "ap_table",
    "difference_tables",
    "convergence_table",
    "cost_table",
    "invariants",
    "machine_line",
    "write_plot",
    "write_report",
    "common_sections",
    "write_text",
    "finish_report",
    "write_plot_or_note",
]

# the small-batch study's norms and the fine-tuning study's arms (d2norm.study.finetune.ARMS)
_ORDER = (
    "BN*",
    "BN",
    "SyncBN",
    "GN",
    "GN+WS",
    "CBN",
    "CBN exact",
    "MABN",
    "BRN",
    "FRN",
    "EvoNorm-S0",
    "BN* random",
)


def norm_order(norms):
    return sorted(set(norms), key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def _cell(v):
    if v is None:
        return "–"
    mean, std, n = v
    return f"{mean:.1f} (n={n})" if std is None else f"{mean:.1f} ± {std:.1f} (n={n})"


def _points(records):
    recs = latest_records(records)
    norms = norm_order(r["norm"] for r in recs)
    bs = sorted({int(r["per_proc"]) for r in recs})
    return recs, norms, bs


def ap_table(records, metric="box_ap", total_batch=8):
    """Rows: norms; columns: images per process b (P = total_batch / b); mean ± sample std (n)."""
    recs, norms, bs = _points(records)
    agg = aggregate(recs, metric)
    lines = [
        "| norm | " + " | ".join(f"b={b} (P={total_batch // b})" for b in bs) + " |",
        "|---|" + "---|" * len(bs),
    ]
    for norm in norms:
        cells = []
        for b in bs:
            cell = _cell(agg.get((norm, b)))
            bad = [
                r["status"]
                for r in recs
                if r["norm"] == norm and int(r["per_proc"]) == b and r.get("status", "ok") != "ok"
            ]
            if bad:
                cell += f" ({len(bad)} {'/'.join(sorted(set(bad)))})"
            if cell == "–" and norm == "SyncBN" and b == total_batch:
                cell = "= BN (one process)"
            cells.append(cell)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(d):
    if d is None:
        return "–"
    mean, ci, n = d
    if isinstance(n, tuple):  # an unpaired difference: (n_a, n_b)
        n = "/".join(map(str, n))
    if ci is None:
        return f"{mean:+.1f} (n={n})"
    return f"{mean:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}] (n={n})"


def difference_tables(records, metric="box_ap", total_batch=8):
    """Two Markdown tables of paired differences with 95% t-intervals:
    (1) per norm, AP(b = total_batch) − AP(b); (2) per b, AP(norm) − AP(BN)."""
    recs, norms, bs = _points(records)
    vals = point_values(recs, metric)
    ref_b = max(bs) if bs else total_batch
    small = [b for b in bs if b != ref_b]
    t1 = [
        "| norm | " + " | ".join(f"AP(b={ref_b}) − AP(b={b})" for b in small) + " |",
        "|---|" + "---|" * len(small),
    ]
    for norm in norms:
        ref = vals.get((norm, ref_b))
        if norm == "SyncBN" and ref is None:
            ref = vals.get(("BN", ref_b))  # SyncBN in one process is BN
        t1.append(
            f"| {norm} | "
            + " | ".join(
                _interval(paired_difference(ref, vals[(norm, b)]) if ref and (norm, b) in vals else None)
                for b in small
            )
            + " |"
        )
    others = [n for n in norms if n != "BN"]
    if not others or not any(n == "BN" for n in norms):
        return "\n".join(t1), "(needs BN and another norm)"
    t2 = ["| b (P) | " + " | ".join(f"{n} − BN" for n in others) + " |", "|---|" + "---|" * len(others)]
    for b in bs:
        bn = vals.get(("BN", b))
        t2.append(
            f"| {b} ({total_batch // b}) | "
            + " | ".join(
                _interval(paired_difference(vals[(n, b)], bn) if bn and (n, b) in vals else None)
                for n in others
            )
            + " |"
        )
    return "\n".join(t1), "\n".join(t2)


def convergence_table(records, metric="box_ap", tail_from=0.8, max_rows=None):
    """AP at the evaluated fractions of the schedule, per run with a curve, and the tail change."""
    rows = convergence(records, metric, tail_from)
    fracs = sorted({f for row in rows for f in row[3]})
    lines = [
        "| norm | b | seed | "
        + " | ".join(f"{f:.0%}" for f in fracs)
        + f" | AP(100%) − AP({tail_from:.0%}) |",
        "|---|---|---|" + "---|" * (len(fracs) + 1),
    ]
    for norm, b, seed, pts, change in rows[:max_rows]:
        lines.append(
            f"| {norm} | {b} | {seed} | "
            + " | ".join(f"{pts[f]:.1f}" if f in pts else "–" for f in fracs)
            + f" | {'–' if change is None else f'{change:+.1f}'} |"
        )
    changes = [r[4] for r in rows if r[4] is not None]
    summary = ""
    if len(changes) >= 2:
        summary = (
            f"Over these {len(changes)} runs, AP(100%) − AP({tail_from:.0%}) has mean "
            f"{statistics.fmean(changes):+.2f} and standard deviation {statistics.stdev(changes):.2f} "
            f"AP (range {min(changes):+.1f} to {max(changes):+.1f})."
        )
    return "\n".join(lines), summary


def cost_table(records, total_batch=8):
    """Median CPU seconds (all processes, training + evaluation) and wall seconds per run."""
    recs, norms, bs = _points(records)
    lines = [
        "| norm | " + " | ".join(f"b={b} (P={total_batch // b})" for b in bs) + " |",
        "|---|" + "---|" * len(bs),
    ]
    for norm in norms:
        cells = []
        for b in bs:
            rs = [r for r in recs if r["norm"] == norm and int(r["per_proc"]) == b and "cpu_s" in r]
            cells.append(
                f"{statistics.median(r['cpu_s'] for r in rs):.0f} / "
                f"{statistics.median(r.get('wall_s', r.get('wall_train_s', 0)) for r in rs):.0f}"
                if rs
                else "–"
            )
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    total = sum(r.get("cpu_s", 0.0) for r in recs)
    return "\n".join(lines), total


def invariants(records, total_batch=8):
    """Checks of the design on the records: every iteration trained ``total_batch`` images, each
    process b of them, and runs with the same seed saw the same images at every point."""
    recs = [r for r in latest_records(records) if "images_digest" in r]
    per_iter_ok = all(r.get("images_per_iter") == [total_batch] for r in recs)
    per_proc_ok = all(r.get("images_per_proc") == [int(r["per_proc"])] for r in recs)
    by_seed = {}
    for r in recs:
        by_seed.setdefault(int(r["seed"]), set()).add(r["images_digest"])
    same_images = all(len(d) == 1 for d in by_seed.values())
    return dict(
        runs=len(recs),
        images_per_iteration_ok=per_iter_ok,
        images_per_process_ok=per_proc_ok,
        same_images_per_seed=same_images,
    )


def machine_line():
    """The machine this process runs on, measured: CPU model, cores, torch, Python."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_plot(path, records, metric="box_ap", title="", total_batch=8):
    """AP vs images per process (log2 axis), one line per norm, error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs, norms, bs = _points(records)
    agg = aggregate(recs, metric)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, norm in enumerate(norms):
        pts = sorted((b, v) for (n, b), v in agg.items() if n == norm)
        if norm == "SyncBN" and ("BN", total_batch) in agg and all(b != total_batch for b, _ in pts):
            pts.append((total_batch, agg[("BN", total_batch)]))  # SyncBN in one process is BN
        if not pts:
            continue
        shift = 2 ** ((i - (len(norms) - 1) / 2) * 0.025)  # small offset so the bars don't overlap
        ax.errorbar(
            [b * shift for b, _ in pts],
            [v[0] for _, v in pts],
            yerr=[v[1] or 0.0 for _, v in pts],
            marker="o",
            capsize=3,
            label=norm,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs)
    ax.set_xticklabels([f"{b}\n(P={total_batch // b})" for b in bs])
    ax.minorticks_off()
    if bs:
        ax.set_xlim(min(bs) / 1.4, max(bs) * 1.4)
    ax.set_xlabel(f"images per process b (P processes, {total_batch} images per iteration)")
    ax.set_ylabel("box AP (hard synthetic val)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "AP vs images per process (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def common_sections(records, total_batch=8):
    """The report's sections that do not depend on the study: convergence, design checks, cost."""
    conv, conv_summary = convergence_table(records)
    cost, total_cpu = cost_table(records, total_batch)
    inv = invariants(records, total_batch)
    return [
        "## Convergence",
        "",
        "Box AP of the runs evaluated along the schedule "
        "(fraction of the iterations); the last column is the change over the last 20%.",
        "",
        conv,
        "",
        conv_summary,
        "",
        "## Design checks (computed from the records)",
        "",
        f"* runs with image records: {inv['runs']}; every iteration trained {total_batch} images: "
        f"{'yes' if inv['images_per_iteration_ok'] else 'NO'}; every process trained b images: "
        f"{'yes' if inv['images_per_process_ok'] else 'NO'}; runs of the same seed trained on the same "
        f"images at every point: {'yes' if inv['same_images_per_seed'] else 'NO'}.",
        "",
        "## Cost per run (CPU seconds of all processes / wall seconds, median over seeds)",
        "",
        cost,
        "",
        f"Total: {total_cpu / 60:.1f} CPU minutes over {len(latest_records(records))} runs.",
        "",
    ]


def write_report(path, records, header="", settings_text="", footer="", total_batch=8, plot_name=None):
    """The Markdown report of ``records`` (tables computed here) between ``header`` and ``footer``."""
    d1, d2 = difference_tables(records, total_batch=total_batch)
    parts = [header.strip(), ""]
    if settings_text:
        parts += ["## Settings", "", settings_text.strip(), ""]
    parts += ["## Box AP (mean ± sample std over seeds)", "", ap_table(records, total_batch=total_batch), ""]
    if plot_name:
        parts += [f"![AP vs images per process]({plot_name})", ""]
    parts += [
        "## Does AP drop with fewer images per process?",
        "",
        "Paired by seed (same initialization, same images), mean difference and 95% t-interval; "
        "positive = the norm loses AP at b images per process.",
        "",
        d1,
        "",
        "## Each norm against BN at equal images per process",
        "",
        "Paired by seed, mean and 95% t-interval of AP(norm) − AP(BN); positive = better than BN.",
        "",
        d2,
        "",
    ]
    finish_report(path, parts, records, footer, total_batch)


def finish_report(path, parts, records, footer="", total_batch=8):
    """Append :func:`common_sections` and ``footer`` to the lines ``parts``, write ``path``."""
    parts = parts + common_sections(records, total_batch)
    if footer:
        parts += [footer.strip(), ""]
    write_text(path, "\n".join(parts))


def write_text(path, text):
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def write_plot_or_note(path, records, total_batch, title):
    """:func:`write_plot`, or a note saying how to get it where matplotlib is missing (the
    records and the tables do not need it)."""
    try:
        write_plot(path, records, total_batch=total_batch, title=title)
    except ImportError as e:
        print(f"note: no plot ({e}). Fix: install matplotlib, then rerun with --report-only.")
