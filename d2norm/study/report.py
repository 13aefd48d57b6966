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
    "finish_report",
    "write_text",
    "write_plot_or_note",
]

# the small-batch study's norms and the fine-tuning study's arms (d2norm.study.finetune.ARMS)
_ORDER = (
    "BN*",
    "BN",
    "SyncBN",
    "GN",
    "GN+WS",
    "BCN+WS",
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


def _cell(v, digits=1):
    if v is None:
        return "–"
    mean, std, n = v
    return f"{mean:.{digits}f} (n={n})" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})"


def _head(bs, total_batch):
    """The two header lines of a norm × b table."""
    return [
        "| norm | " + " | ".join(f"b={b} (P={total_batch // b})" for b in bs) + " |",
        "|---|" + "---|" * len(bs),
    ]


def _points(records):
    recs = latest_records(records)
    norms = norm_order(r["norm"] for r in recs)
    bs = sorted({int(r["per_proc"]) for r in recs})
    return recs, norms, bs


def ap_table(records, metric="box_ap", total_batch=8, digits=1, only_measured=False):
    """Rows: norms; columns: images per process b (P = total_batch / b); mean ± sample std (n).
    ``only_measured``: leave out the norms (rows) and b (columns) without a value of ``metric``."""
    recs, norms, bs = _points(records)
    agg = aggregate(recs, metric)
    if only_measured:
        norms = [n for n in norms if any(k[0] == n for k in agg)]
        bs = [b for b in bs if any(k[1] == b for k in agg)]
    lines = _head(bs, total_batch)
    for norm in norms:
        cells = []
        for b in bs:
            cell = _cell(agg.get((norm, b)), digits)
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


def difference_tables(records, metric="box_ap", total_batch=8, only_measured=False):
    """Two Markdown tables of paired differences with 95% t-intervals:
    (1) per norm, AP(b = total_batch) − AP(b); (2) per b, AP(norm) − AP(BN)."""
    recs, norms, bs = _points(records)
    vals = point_values(recs, metric)
    if only_measured:
        norms = [n for n in norms if any(k[0] == n for k in vals)]
        bs = [b for b in bs if any(k[1] == b for k in vals)]
    ref_b = max(bs) if bs else total_batch
    small = [b for b in bs if b != ref_b]
    t1 = [
        "| norm | " + " | ".join(f"AP(b={ref_b}) − AP(b={b})" for b in small) + " |",
        "|---|" + "---|" * len(small),
    ]
    for norm in norms if small else ():
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
    if not small:
        t1 = ["(needs two values of b)"]
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


#: the claims of the decision rule (docs/small_batch_study_header.md): (name, norm) pairs
RECOVERY_NORMS = ("GN", "GN+WS", "MABN")
#: the band, in AP, within which a norm's own drop AP(8) − AP(1) counts as "no drop"
FLAT_BAND = 3.0
#: the number of primary comparisons the rule makes (Bonferroni level: 1 − 0.05 / this)
PRIMARY_COMPARISONS = 6


def _above_zero(d):
    return d is not None and d[1] is not None and d[1][0] > 0


def _within(d, band):
    return d is not None and d[1] is not None and -band <= d[1][0] and d[1][1] <= band


def _shift(values_a, values_b):
    """{seed: a − b} over the seeds both have."""
    return {k: values_a[k] - values_b[k] for k in set(values_a) & set(values_b)}


def decision_rows(records, metric="box_ap", small=1, ref=8, band=FLAT_BAND, comparisons=PRIMARY_COMPARISONS):
    """The decision rule's claims: [(claim, [(comparison, interval), ...], established, holds at the
    Bonferroni level)]. An interval is ``(mean, (lo, hi) or None, n)`` (see ``paired_difference``)."""
    vals = point_values(records, metric)
    bonf = 1 - 0.05 / comparisons

    def diff(a, b, level=0.95):
        if a is None or b is None:
            return None
        return paired_difference(a, b, level)

    def v(norm, b, m=metric):
        return (point_values(records, m) if m != metric else vals).get((norm, b))

    rows = []

    def claim(name, parts):
        # parts: [(label, values_a, values_b, test)], test "above" or "within"
        shown, ok, ok_b = [], True, True
        for label, a, b, test in parts:
            d, d_b = diff(a, b), diff(a, b, bonf)
            shown.append((label, d))
            check = _above_zero if test == "above" else (lambda x: _within(x, band))
            ok, ok_b = ok and check(d), ok_b and check(d_b)
        rows.append((name, shown, ok, ok_b))

    bn1, bn8 = v("BN", small), v("BN", ref)
    claim("BN degrades at b = 1", [(f"AP(BN, {ref}) − AP(BN, {small})", bn8, bn1, "above")])
    for x in RECOVERY_NORMS:
        claim(
            f"{x} recovers",
            [
                (f"AP({x}, {small}) − AP(BN, {small})", v(x, small), bn1, "above"),
                (f"AP({x}, {ref}) − AP({x}, {small}) within ±{band:g}", v(x, ref), v(x, small), "within"),
            ],
        )
    sync1 = v("SyncBN", small)
    claim(
        "SyncBN control: BN's loss is its per-process statistics",
        [
            (f"AP(SyncBN, {small}) − AP(BN, {small})", sync1, bn1, "above"),
            (f"AP(BN, {ref}) − AP(SyncBN, {small}) within ±{band:g}", bn8, sync1, "within"),
        ],
    )
    pre = f"precise_{metric}"
    re1, re8 = v("BN", small, pre), v("BN", ref, pre)
    gain1 = _shift(re1, bn1) if re1 and bn1 else None
    gain8 = _shift(re8, bn8) if re8 and bn8 else None
    claim(
        "BN's drop is in its evaluation statistics",
        [(f"[AP_re − AP](BN, {small}) − [AP_re − AP](BN, {ref})", gain1, gain8, "above")],
    )
    return rows


def decision_table(records, metric="box_ap", **kw):
    """The decision rule's claims as a Markdown table (see :func:`decision_rows`)."""
    lines = [
        "| claim | comparison: mean [95% interval] (n) | verdict | at the Bonferroni level |",
        "|---|---|---|---|",
    ]
    for name, shown, ok, ok_b in decision_rows(records, metric, **kw):
        comp = "; ".join(f"{label}: {_interval(d)}" for label, d in shown)
        lines.append(
            f"| {name} | {comp} | {'**established**' if ok else 'not established'} | "
            f"{'holds' if ok_b else '–'} |"
        )
    return "\n".join(lines)


def pooled_sd(values):
    """Pooled within-point standard deviation of ``{point: {seed: value}}`` and its df."""
    ss, df = 0.0, 0
    for by_seed in values.values():
        xs = list(by_seed.values())
        if len(xs) > 1:
            m = statistics.fmean(xs)
            ss += sum((x - m) ** 2 for x in xs)
            df += len(xs) - 1
    return (ss / df) ** 0.5 if df else None, df


def tail_average_table(records, metrics=("box_ap", "precise_box_ap")):
    """Seed-to-seed spread of the final AP against the AP averaged over the last checkpoints, over
    the runs that have both (pooled within-point SD, the same runs for each pair)."""
    recs = latest_records(records)
    lines = [
        "| metric | runs | pooled SD, final | pooled SD, mean of last 3 | ratio |",
        "|---|---|---|---|---|",
    ]
    for m in metrics:
        tail_key = f"{m}_last3"
        both = [r for r in recs if r.get(tail_key) is not None and r.get(m) is not None]
        sd_f, df = pooled_sd(point_values(both, m))
        sd_t, _ = pooled_sd(point_values(both, tail_key))
        if sd_f is None or sd_t is None:
            continue
        lines.append(f"| {m} | {len(both)} (df {df}) | {sd_f:.2f} | {sd_t:.2f} | {sd_t / sd_f:.2f} |")
    return "\n".join(lines)


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
    lines = _head(bs, total_batch)
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


def write_report(path, records, header="", settings_text="", footer="", total_batch=8, plot_name=None):
    """The Markdown report of ``records`` (tables computed here) between ``header`` and ``footer``."""
    d1, d2 = difference_tables(records, total_batch=total_batch)
    parts = [header.strip(), ""]
    if settings_text:
        parts += ["## Settings", "", settings_text.strip(), ""]
    parts += [
        "## Decision",
        "",
        "The decision rule stated at the top, applied to the records below (paired by seed, 95% "
        f"t-intervals; the last column: the same at the Bonferroni level for {PRIMARY_COMPARISONS} "
        "comparisons).",
        "",
        decision_table(records),
        "",
    ]
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
    if any(r.get("precise_box_ap") is not None for r in records):
        p1, p2 = difference_tables(records, "precise_box_ap", total_batch, only_measured=True)
        parts += [
            "## Box AP with re-estimated statistics",
            "",
            "The same models, evaluated after re-estimating every running statistic over the same "
            "160 training images (population statistics; `d2norm/study/evaluation.py`). Runs of the "
            "first grid (seeds 0–2) were not evaluated this way.",
            "",
            ap_table(records, "precise_box_ap", total_batch, only_measured=True),
            "",
            "Drop with fewer images per process, re-estimated statistics (paired, 95% t):",
            "",
            p1,
            "",
            "Against BN, re-estimated statistics (paired, 95% t):",
            "",
            p2,
            "",
        ]
    tail = tail_average_table(records)
    if tail.count("\n") > 1:
        parts += [
            "## AP averaged over the last three checkpoints",
            "",
            "Seed-to-seed spread (pooled within-point standard deviation) of the final AP and of the "
            "mean AP of the checkpoints at 280, 290 and 300 iterations, over the same runs; a ratio "
            "below 1 is the share of the spread that averaging keeps.",
            "",
            tail,
            "",
        ]
    if any(r.get("val_loss") is not None for r in records):
        parts += [
            "## Val loss",
            "",
            "detectron2's training losses on the val split with every norm in eval mode (mean ± std).",
            "",
            ap_table(records, "val_loss", total_batch, digits=3, only_measured=True),
            "",
            "With re-estimated statistics:",
            "",
            ap_table(records, "precise_val_loss", total_batch, digits=3, only_measured=True),
            "",
        ]
    finish_report(path, parts, records, footer, total_batch)


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
