"""Statistics of the study: means over seeds, paired differences with 95% t-intervals.

A point is (norm, images per process b). Runs at two points with the same seed share the
weight initialization and the order of the images, so differences are taken per seed (paired)
and summarized by a Student-t interval (across norms, where pairing by seed buys nothing, the
unpaired Welch interval of :func:`welch_difference`):

    d_s = AP(point A, seed s) - AP(point B, seed s),   s in the seeds both points have
    mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)        (n >= 2; sd = sample standard deviation)
"""

import math
import statistics

from .records import latest_records

__all__ = ["t_quantile", "point_values", "aggregate", "paired_difference", "welch_difference", "convergence"]


def _t_pdf(x, df):
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


def _t_cdf_upper_half(x, df, steps=2000):
    """P(0 <= T <= x) by Simpson's rule (x >= 0)."""
    h = x / steps
    s = _t_pdf(0.0, df) + _t_pdf(x, df)
    s += 4 * sum(_t_pdf((2 * i - 1) * h, df) for i in range(1, steps // 2 + 1))
    s += 2 * sum(_t_pdf(2 * i * h, df) for i in range(1, steps // 2))
    return s * h / 3


def t_quantile(p, df):
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_upper_half(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if 0.5 + _t_cdf_upper_half(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def point_values(records, metric="box_ap"):
    """{(norm, b): {seed: value}} over the finished runs (status "ok") with a value."""
    out = {}
    for r in latest_records(records):
        if r.get("status", "ok") != "ok" or r.get(metric) is None:
            continue
        out.setdefault((r["norm"], int(r["per_proc"])), {})[int(r["seed"])] = float(r[metric])
    return out


def aggregate(records, metric="box_ap"):
    """{(norm, b): (mean, sample std or None, n)} of ``metric`` over seeds."""
    out = {}
    for key, by_seed in point_values(records, metric).items():
        vals = [by_seed[s] for s in sorted(by_seed)]
        std = statistics.stdev(vals) if len(vals) > 1 else None
        out[key] = (statistics.fmean(vals), std, len(vals))
    return out


def paired_difference(values_a, values_b, level=0.95):
    """Mean of the per-seed differences a - b, its 95% t-interval (None with < 2 seeds), n.

    ``values_a``, ``values_b``: {seed: value}; only seeds present in both count."""
    seeds = sorted(set(values_a) & set(values_b))
    d = [values_a[s] - values_b[s] for s in seeds]
    if not d:
        return None
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, None, len(d)
    half = t_quantile(0.5 + level / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean, (mean - half, mean + half), len(d)


def welch_difference(values_a, values_b, level=0.95):
    """Mean of a − mean of b, its Welch 95% t-interval (None unless both have >= 2 values), (n_a, n_b).

    ``values_a``, ``values_b``: {seed: value} (all values count, unpaired)::

        se² = s_a²/n_a + s_b²/n_b,  df = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))
    """
    a, b = list(values_a.values()), list(values_b.values())
    if not a or not b:
        return None
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return mean, None, (len(a), len(b))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return mean, (mean, mean), (len(a), len(b))
    df = se2 * se2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile(0.5 + level / 2, max(1.0, df)) * math.sqrt(se2)
    return mean, (mean - half, mean + half), (len(a), len(b))


def convergence(records, metric="box_ap", tail_from=0.8):
    """Per run with an AP curve: (norm, b, seed, {fraction of schedule: AP}, change over the tail).

    The change is AP(end) - AP(at ``tail_from`` of the schedule): a converged run has a change
    within the noise of the evaluation (compare with the seed spread of the same point)."""
    rows = []
    for r in latest_records(records):
        curve = r.get("curve") or {}
        if r.get("status", "ok") != "ok" or not curve:
            continue
        pts = {int(k) / int(r["iters"]): v[metric] for k, v in curve.items() if metric in v}
        start = min((f for f in pts if f >= tail_from - 1e-9), default=None)
        change = pts[max(pts)] - pts[start] if start is not None and start < max(pts) else None
        rows.append((r["norm"], int(r["per_proc"]), int(r["seed"]), pts, change))
    return sorted(rows, key=lambda x: (x[0], -x[1], x[2]))
