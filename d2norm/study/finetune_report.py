"""The fine-tuning study's report: the small-batch study's tables plus the decisions of its rule.

The decision rule (docs/finetune_study.md, stated before the runs), computed here from the
records; every interval is a 95% t-interval, across arms unpaired (Welch), within an arm paired
by seed:

* **positive control**: the pretraining does ImageNet's job when AP(BN*, 8) − AP(BN* random, 8)
  has its interval above +5 AP;
* **BN per process degrades** at b = 2 when the interval of AP(BN, 8) − AP(BN, 2) excludes 0;
* **arm X recovers** at b = 2 when the interval of AP(X, 2) − AP(BN, 2) lies above 0 and the
  interval of X's own AP(8) − AP(2) lies within ±3 AP;
* **CBN's paper gradient collapses** in this regime when the interval of AP(CBN, 2) − AP(BN*, 2)
  lies below 0; it **does not collapse** when that interval lies above −3 AP; else undecided.
  The same rule is applied to "CBN exact".

No verdict is drawn before every point a rule reads has :data:`MIN_SEEDS` seeds ("pending";
the interval is still shown).

Added after the first records (post hoc, labelled so in the report): the BN* twin has no norm in
its FPN and a 2fc box head, the CBN twin the recipe's normalized FPN and 4conv1fc head, so
AP(CBN, 2) − AP(BN*, 2) also holds the difference of the heads, which
AP(BN, 8) − AP(BN*, 8) (Welch; no small batch in it) measures. The same-head reading compares CBN
with BN at b = 2 (its twin's layout with per-process BN): CBN **collapses (same head)** when the
interval of AP(CBN, 2) − AP(BN, 2) lies below 0, **does not collapse (same head)** when it lies
above −3 AP.
"""

from .records import latest_records
from .report import _interval, _within, ap_table, difference_tables, finish_report
from .stats import paired_difference, point_values, welch_difference

__all__ = [
    "CONTROL_MARGIN",
    "FLAT_BAND",
    "MIN_SEEDS",
    "decisions",
    "decision_table",
    "write_finetune_report",
]

CONTROL_MARGIN = 5.0  # AP: the positive control's interval must lie above this
FLAT_BAND = 3.0  # AP: "X's own AP(8) − AP(2) lies within ± this"
REF_B, SMALL_B = 8, 2
MIN_SEEDS = 5  # seeds every point a rule reads must have before it gives a verdict
PENDING = f"pending (n < {MIN_SEEDS})"


def _excludes_above(d, bound=0.0):
    return d is not None and d[1] is not None and d[1][0] > bound


def _below(d, bound=0.0):
    return d is not None and d[1] is not None and d[1][1] < bound


def _ready(*diffs):
    """Whether every difference has an interval over >= :data:`MIN_SEEDS` seeds per point."""
    for d in diffs:
        if d is None or d[1] is None:
            return False
        n = d[2] if isinstance(d[2], tuple) else (d[2],)
        if min(n) < MIN_SEEDS:
            return False
    return True


def _gated(verdict, *diffs):
    """``verdict`` once every difference it reads is :func:`_ready`, else "pending"."""
    return verdict if _ready(*diffs) else PENDING


def _collapse(d):
    verdict = (
        "collapses" if _below(d) else ("does not collapse" if _excludes_above(d, -FLAT_BAND) else "undecided")
    )
    return _gated(verdict, d)


def decisions(records, metric="box_ap"):
    """{arm: dict(vs_bn=..., own_drop=..., verdict=...)} and the control / CBN entries, from ``records``."""
    vals = point_values(latest_records(records), metric)

    def v(arm, b):
        if arm == "SyncBN" and b == REF_B and (arm, b) not in vals:
            return vals.get(("BN", b))  # SyncBN in one process is BN
        return vals.get((arm, b))

    out = {}
    control = welch_difference(v("BN*", REF_B) or {}, v("BN* random", REF_B) or {})
    out["control"] = dict(
        diff=control,
        verdict=_gated(
            "passes"
            if _excludes_above(control, CONTROL_MARGIN)
            else ("fails" if _below(control, CONTROL_MARGIN) else "undecided"),
            control,
        ),
    )
    out["heads"] = welch_difference(v("BN", REF_B) or {}, v("BN*", REF_B) or {})
    bn_drop = paired_difference(v("BN", REF_B) or {}, v("BN", SMALL_B) or {})
    out["BN"] = dict(
        own_drop=bn_drop,
        verdict=_gated(
            "degrades" if _excludes_above(bn_drop) else ("improves" if _below(bn_drop) else "no drop shown"),
            bn_drop,
        ),
    )
    arms = sorted({a for a, _ in vals} - {"BN", "BN* random"})
    for arm in arms:
        vs_bn = welch_difference(v(arm, SMALL_B) or {}, v("BN", SMALL_B) or {})
        own = paired_difference(v(arm, REF_B) or {}, v(arm, SMALL_B) or {})
        better, flat = _excludes_above(vs_bn), _within(own, FLAT_BAND)
        verdict = _gated(
            "recovers"
            if better and flat
            else f"not shown ({'above' if better else 'not above'} BN; {'flat' if flat else 'not flat'})",
            vs_bn,
            own,
        )
        out[arm] = dict(vs_bn=vs_bn, own_drop=own, verdict=verdict)
    for cbn in ("CBN", "CBN exact"):
        d = welch_difference(v(cbn, SMALL_B) or {}, v("BN*", SMALL_B) or {})
        if cbn in out:
            out[cbn]["vs_bn_star"] = d
            out[cbn]["collapse"] = _collapse(d)
            out[cbn]["collapse_same_head"] = _collapse(out[cbn]["vs_bn"])
    return out


def decision_table(records, metric="box_ap"):
    """The decision rule applied to ``records``, as Markdown."""
    dec = decisions(records, metric)
    lines = [
        f"| arm | AP(arm, {SMALL_B}) − AP(BN, {SMALL_B}) (Welch) | own AP({REF_B}) − AP({SMALL_B}) (paired) "
        "| decision |",
        "|---|---|---|---|",
    ]
    from .report import norm_order

    for arm in norm_order(a for a in dec if a not in ("control", "heads")):
        d = dec[arm]
        lines.append(
            f"| {arm} | {_interval(d.get('vs_bn')) if arm != 'BN' else '–'} | {_interval(d['own_drop'])} "
            f"| {d['verdict']} |"
        )
    lines += [
        "",
        f"* Positive control, AP(BN*, {REF_B}) − AP(BN* random, {REF_B}) (Welch): "
        f"{_interval(dec['control']['diff'])}: **{dec['control']['verdict']}** "
        f"(passes when the interval lies above +{CONTROL_MARGIN:g} AP).",
    ]
    for cbn in ("CBN", "CBN exact"):
        if cbn in dec and "collapse" in dec[cbn]:
            lines.append(
                f"* {cbn}: AP({cbn}, {SMALL_B}) − AP(BN*, {SMALL_B}) (Welch): "
                f"{_interval(dec[cbn]['vs_bn_star'])}: **{dec[cbn]['collapse']}**."
            )
    lines.append(
        f"* *Post hoc* — the heads' difference without a small batch, AP(BN, {REF_B}) − "
        f"AP(BN*, {REF_B}) (Welch): {_interval(dec['heads'])} (the BN* twin: no norm in the FPN, "
        "2fc box head; the CBN and BN twins: the recipe's normalized FPN and 4conv1fc head)."
    )
    for cbn in ("CBN", "CBN exact"):
        if cbn in dec and "collapse_same_head" in dec[cbn]:
            lines.append(
                f"* *Post hoc* — {cbn} against the same head, AP({cbn}, {SMALL_B}) − AP(BN, {SMALL_B}) "
                f"(Welch): {_interval(dec[cbn]['vs_bn'])}: **{dec[cbn]['collapse_same_head']} "
                "(same head)**."
            )
    return "\n".join(lines)


def write_finetune_report(
    path, records, header="", settings_text="", footer="", total_batch=8, plot_name=None
):
    """docs/finetune_study.md: header (design, rule), tables and decisions from ``records``, footer."""
    d1, _ = difference_tables(records, total_batch=total_batch)
    parts = [header.strip(), ""]
    if settings_text:
        parts += ["## Settings", "", settings_text.strip(), ""]
    parts += [
        "## Box AP (mean ± sample std over seeds)",
        "",
        "Rank 0's model, as detectron2 saves it (for SyncBN and BN its statistics are rank 0's running "
        "averages, or detectron2's Precise BN where the recipe enables it).",
        "",
        ap_table(records, total_batch=total_batch),
        "",
    ]
    if plot_name:
        parts += [f"![AP per arm at b = 8 and b = 2]({plot_name})", ""]
    parts += [
        "## Box AP with re-estimated statistics",
        "",
        "The same models with every running statistic (BN, SyncBN, CBN, MABN; not the frozen "
        "BN* / FrozenStatsBN) re-estimated over the same 160 training images (population "
        "statistics; `d2norm/study/evaluation.py`); arms without such layers are not listed.",
        "",
        ap_table(records, "precise_box_ap", total_batch, only_measured=True),
        "",
        "## Decisions (the rule stated above, applied to the box AP table)",
        "",
        "Intervals: mean and 95% t-interval; across arms unpaired (Welch), within an arm paired by seed.",
        "",
        decision_table(records),
        "",
        "## Does AP drop from 8 to 2 images per process? (paired by seed)",
        "",
        d1,
        "",
    ]
    finish_report(path, parts, records, footer, total_batch)
