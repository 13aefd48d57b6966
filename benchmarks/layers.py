#!/usr/bin/env python
"""Every norm layer side by side: fwd+bwd time and peak memory, as ratios to torch BatchNorm2d.

    python benchmarks/layers.py [--quick] [--device cpu|cuda] [--threads T] [--reps N]
                                [--output docs/benchmarks.md] [--plot docs/benchmarks.png]

Two groups, each run on detection-like shapes (``--quick``: smaller ones):

* **norm alone** (input = the feature map; reference ``torch.nn.BatchNorm2d``): BN, FrozenBN
  (detectron2's ``FrozenBatchNorm2d``), SyncBN in one process, GN (32 groups), MABN, and MABN in
  the official formulation (``tests/reference/mabn_reference.py``: a Python autograd.Function
  reading the iteration counter with ``.item()``). MABN variants run in the steady state (past
  warm-up, moving averages and the renorm clamp active).
* **conv + norm pair** (input = the conv's input; reference conv + ``nn.BatchNorm2d``), so that
  conv-side work is included: GN, GN+WS (the conv's weight standardized through its
  parametrization, recomputed every forward), CBN with its statistic gradients (window k = 3,
  windows filled during warm-up), the autograd.grad formulation of CBN
  (``tests/reference/cbn_reference.py``), the CBN floor (conv + BN plus the one conv weight
  gradient dnu/dW that any exact CBN computes), and MABN with its weight-centralized conv.

Time: every variant runs fwd+bwd on the same input and upstream gradient; variants alternate
within each repetition (A, B, C, A, B, C, ...) after warm-up, and the median is reported, so a
load change on a shared machine hits all variants alike.

Memory, measured in a separate, untimed step per variant:

* ``peak``: the peak of tensor allocations during one fwd+bwd above the allocations live before
  it. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at the start. CPU:
  the allocation / free events recorded by ``torch.profiler`` (``profile_memory=True``), summed
  in time order; the maximum of that running sum.
* ``saved``: bytes of the distinct tensors autograd keeps for backward (collected with
  ``torch.autograd.graph.saved_tensors_hooks``), excluding the input, parameters and buffers.
* ``state``: bytes of persistent layer state beyond BN's (CBN history, MABN ring buffers).

The script writes (replaces) the "Layers" section of ``--output`` (Markdown) and redraws the
bar chart ``--plot`` from all sections (``benchmarks/model.py`` writes the "Model" section).
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler's C++ start/stop lines
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import d2norm  # noqa: E402,F401  (must precede detectron2.layers)
from reference.cbn_reference import ReferenceConvCBN  # noqa: E402
from reference.mabn_reference import OfficialStyleMABN2d  # noqa: E402

from d2norm.layers import (  # noqa: E402
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
from d2norm.layers.cross_iteration_batch_norm import _conv_padding, sqmean_weight_gradient  # noqa: E402

# name: (N, C, H, W) of the normalized feature map
NORM_SHAPES = {
    "2x256x200x304 (P2)": (2, 256, 200, 304),
    "2x2048x25x38 (res5)": (2, 2048, 25, 38),
}
QUICK_NORM_SHAPES = {
    "2x256x50x76": (2, 256, 50, 76),
    "2x2048x7x10": (2, 2048, 7, 10),
}
# name: (conv input shape, conv kwargs); the conv output is the feature map above
PAIR_SHAPES = {
    "3x3 256->256 @ 2x256x200x304 (FPN P2 output conv)": (
        (2, 256, 200, 304), dict(in_channels=256, out_channels=256, kernel_size=3, padding=1)),
    "1x1 512->2048 @ 2x512x25x38 (res5 conv3)": (
        (2, 512, 25, 38), dict(in_channels=512, out_channels=2048, kernel_size=1)),
}
QUICK_PAIR_SHAPES = {
    "3x3 256->256 @ 2x256x50x76": (
        (2, 256, 50, 76), dict(in_channels=256, out_channels=256, kernel_size=3, padding=1)),
    "1x1 512->2048 @ 2x512x7x10": (
        (2, 512, 7, 10), dict(in_channels=512, out_channels=2048, kernel_size=1)),
}
CBN_K = 3
MABN_BUFFER = 8
MABN_WARMUP = 100

NORM_VARIANTS = ["BN (torch)", "FrozenBN", "SyncBN (1 proc)", "GN", "MABN", "MABN official-style"]
# Batch Renormalization (past its ramp: r, d clipped at the full bounds), FRN + TLU, EvoNorm-S0
NEW_NORM_VARIANTS = ["BRN", "FRN", "EvoNorm-S0"]
NORM_VARIANTS += NEW_NORM_VARIANTS
CBN_FLOOR = "conv+BN+dnu/dW (CBN floor)"
PAIR_VARIANTS = ["conv+BN (torch)", "conv+GN", "conv+GN+WS", "conv+CBN", CBN_FLOOR,
                 "conv+CBN autograd.grad ref", "conv+MABN (centralized conv)"]


class BatchNormWithNuGradient(nn.Module):
    """conv + BN that also computes dnu/dW (one conv weight gradient for grad_output 2y/M) per
    training forward: the least work any exact CBN adds to conv + BN."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            with torch.no_grad():
                c = self.conv
                sqmean_weight_gradient(x.detach(), y.detach(), c.weight.detach(), c.stride,
                                       _conv_padding(c), c.dilation, c.groups)
        return self.bn(y)


# ----------------------------------------------------------------------------- building
def _mabn_steady(m):
    steady = max(1000, MABN_WARMUP) + MABN_BUFFER + 1
    m.iters.fill_(steady)
    m.buffer_x2.fill_(1.0)
    m.buffer_gz.fill_(0.01)
    return m


def build_norm_variant(name, c):
    from detectron2.layers import FrozenBatchNorm2d

    if name == "BN (torch)":
        return nn.BatchNorm2d(c)
    if name == "FrozenBN":
        return FrozenBatchNorm2d(c)
    if name == "SyncBN (1 proc)":
        return SyncBatchNorm2d(c)
    if name == "GN":
        return GroupNorm(32, c)
    if name == "MABN":
        return _mabn_steady(MovingAverageBatchNorm2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
    if name == "MABN official-style":
        return _mabn_steady(OfficialStyleMABN2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
    if name == "BRN":
        brn = BatchRenorm2d(c)
        brn.iters.fill_(brn.r_max_end)  # past the ramp (same work at every step)
        return brn
    if name == "FRN":
        return FilterResponseNorm2d(c)
    if name == "EvoNorm-S0":
        return EvoNormS0(c, num_groups=32)
    raise KeyError(name)


def build_pair_variant(name, conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(bias=False, **conv_kw)
    c = conv_kw["out_channels"]
    if name == "conv+BN (torch)":
        return nn.Sequential(conv, nn.BatchNorm2d(c))
    if name == "conv+GN":
        return nn.Sequential(conv, GroupNorm(32, c))
    if name == "conv+GN+WS":
        gn = GroupNormWS(32, c)
        gn.prepare_preceding_conv(conv)  # the parametrization d2norm.prepare_model installs
        return nn.Sequential(conv, gn)
    if name == "conv+CBN":
        cbn = CrossIterationBatchNorm2d(c, buffer_size=CBN_K)
        cbn.bind(conv)
        return nn.Sequential(conv, cbn)
    if name == "conv+CBN autograd.grad ref":
        return ReferenceConvCBN(conv, buffer_size=CBN_K)
    if name == CBN_FLOOR:
        return BatchNormWithNuGradient(conv, nn.BatchNorm2d(c))
    if name == "conv+MABN (centralized conv)":
        mabn = _mabn_steady(MovingAverageBatchNorm2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
        mabn.prepare_preceding_conv(conv)
        return nn.Sequential(conv, mabn)
    raise KeyError(name)


def state_bytes(name, model):
    """Persistent state beyond BN's (running stats and affine parameters excluded)."""
    if "autograd.grad" in name:
        return sum(t.numel() * t.element_size() for e in model.history for t in e)
    skip = {"running_mean", "running_var", "num_batches_tracked", "weight", "bias"}
    total = 0
    for n, b in model.named_buffers():
        if n.split(".")[-1] not in skip:
            total += b.numel() * b.element_size()
    return total


# ----------------------------------------------------------------------------- measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clear_grads(model, x):
    for p in model.parameters():
        p.grad = None
    x.grad = None


def step(model, x, g):
    clear_grads(model, x)
    model(x).backward(g)


def steps(model, x, g, n):
    for _ in range(n):
        step(model, x, g)


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (the profiler's C++ start / stop lines) for a moment."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn, device):
    """Peak of tensor allocations during ``fn()`` above what was allocated before (see doc)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    run = peak = 0
    for _, n in events:
        run += n
        peak = max(peak, run)
    return peak


def saved_bytes(model, x, g):
    """Bytes of distinct tensors saved for backward, excluding x, parameters and buffers."""
    exclude = {x.untyped_storage().data_ptr()}
    exclude |= {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in exclude and key not in seen:
                seen[key] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for p in model.parameters():
            p.grad = None
        x.grad = None
        out = model(x)
    out.backward(g)
    return sum(seen.values())


def bench_group(variants, builders, x_shape, device, reps, warmup):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen).to(device).requires_grad_(True)
    models = {v: builders(v).to(device).train() for v in variants}
    with torch.no_grad():
        out_shape = models[variants[0]](x).shape
    g = torch.randn(out_shape, generator=gen).to(device)
    t_warm = {}
    for _ in range(warmup):
        for v in variants:
            sync(device)
            t0 = time.perf_counter()
            step(models[v], x, g)
            sync(device)
            t_warm[v] = time.perf_counter() - t0
    # short steps are timed in blocks of several (>= ~30 ms per sample), the same for all variants
    block = max(1, min(50, int(0.03 / max(min(t_warm.values()), 1e-6))))
    times = {v: [] for v in variants}
    for _ in range(reps):
        for v in variants:
            sync(device)
            t0 = time.perf_counter()
            steps(models[v], x, g, block)
            sync(device)
            times[v].append((time.perf_counter() - t0) / block)
    res = {}
    for v in variants:
        m = models[v]

        def fwd_bwd(m=m):
            m(x).backward(g)

        peaks = []
        for _ in range(3):  # grads cleared outside the profiled region: it frees nothing older
            clear_grads(m, x)
            peaks.append(peak_bytes(fwd_bwd, device))
        res[v] = dict(ms=statistics.median(times[v]) * 1e3, min_ms=min(times[v]) * 1e3,
                      peak=statistics.median(peaks), saved=saved_bytes(m, x, g),
                      state=state_bytes(v, m), block=block)
    ref = res[variants[0]]
    for v in variants:
        r = res[v]
        r["time_ratio"] = r["ms"] / ref["ms"]
        r["peak_ratio"] = r["peak"] / ref["peak"] if ref["peak"] else float("nan")
        r["saved_ratio"] = r["saved"] / ref["saved"] if ref["saved"] else float("nan")
    return res


# ----------------------------------------------------------------------------- reporting
def setup_device(args):
    """The torch device of ``args.device`` (exits if CUDA is asked for but absent); applies
    ``args.threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def machine_line(device):
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        dev = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        dev = f"{dev}, {os.cpu_count()} cores"
    return (f"{dev}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
            f"Python {platform.python_version()}")


def load_note():
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return ""


def _mb(b):
    return f"{b / 2 ** 20:.1f}"


def table(res, variants):
    lines = ["| variant | median ms | time vs ref | peak MB | peak vs ref | saved MB | extra state KB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        r = res[v]
        lines.append(f"| {v} | {r['ms']:.1f} | {r['time_ratio']:.2f}x | {_mb(r['peak'])} | "
                     f"{r['peak_ratio']:.2f}x | {_mb(r['saved'])} | {r['state'] / 1024:.0f} |")
    return "\n".join(lines)


HEADER = """# Benchmarks

Speed and memory of d2norm's normalization methods, measured side by side in one run per script
(variants interleaved, medians reported). Regenerate with the commands in each section; the
chart `benchmarks.png` shows the time ratios of both sections. On a machine shared with other
jobs the absolute times are noisy; the ratios, measured interleaved, are the result.
"""


def update_section(path, name, body, data):
    """Replace (or append) the section ``name`` of the Markdown file ``path``.

    The section is delimited by HTML comments and carries its data as JSON in a comment, so the
    chart can be redrawn from the file alone."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = (f"{begin}\n{body.strip()}\n\n<!-- DATA {name} {json.dumps(data)} -->\n{end}")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else HEADER
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        order = ["layers", "model"]  # keep the sections in this order
        later = [n for n in order[order.index(name) + 1:]] if name in order else []
        pos = min((text.find(f"<!-- BEGIN {n} -->") for n in later if f"<!-- BEGIN {n} -->" in text),
                  default=-1)
        text = (text[:pos] + block + "\n\n" + text[pos:]) if pos >= 0 else (text.rstrip() + "\n\n" + block + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_sections(path):
    if not os.path.exists(path):
        return {}
    out = {}
    for m in re.finditer(r"<!-- DATA (\w+) (\{.*?\}) -->", open(path, encoding="utf-8").read(), re.S):
        out[m.group(1)] = json.loads(m.group(2))
    return out


def draw_chart(md_path, png_path):
    """Bar chart of the time ratios of every section found in ``md_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_sections(md_path)
    text = open(md_path, encoding="utf-8").read()
    model_order = ["BN*", "BN", "SyncBN", "GN", "GN+WS", "CBN", "CBN floor", "MABN",
                   "BRN", "FRN", "EvoNorm-S0"]

    def ordered(items, order):
        rank = {k: i for i, k in enumerate(order)}
        return sorted(items, key=lambda kv: rank.get(kv[0].replace(" folded", ""), len(rank))
                      + (0.5 if kv[0].endswith(" folded") else 0))

    panels = []
    lay = data.get("layers")
    if lay:
        for gname, order in (("norm", NORM_VARIANTS), ("pair", PAIR_VARIANTS)):
            shapes = sorted(lay.get(gname, {}).items(), key=lambda kv: text.find(kv[0]))
            for shape, res in shapes:
                panels.append((f"{'norm alone' if gname == 'norm' else 'conv + norm'}: {shape}",
                               [(v, r["time_ratio"], r.get("peak_ratio"))
                                for v, r in ordered(res.items(), order)],
                               "fwd+bwd time / reference"))
    mod = data.get("model")
    if mod:
        rows = ordered(mod.get("train", {}).items(), model_order)
        panels.append((f"Mask R-CNN R-50-FPN training iteration ({mod.get('size', '')})",
                       [(v, r["time_ratio"], r.get("peak_ratio")) for v, r in rows],
                       "iteration time / BN*"))
        inf = ordered(mod.get("inference", {}).items(), model_order)
        if inf:
            panels.append(("inference per image (before / after folding)",
                           [(v, r["ratio"], None) for v, r in inf], "time / BN* unfolded"))
    if not panels:
        return
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(12, 3.6 * rows_n), squeeze=False)
    for ax, (title, bars, ylabel) in zip(axes.flat, panels):
        names = [b[0] for b in bars]
        t = [b[1] for b in bars]
        pk = [b[2] for b in bars]
        xs = range(len(names))
        has_peak = any(p is not None and p == p for p in pk)
        w = 0.4 if has_peak else 0.7
        ax.bar([x - (w / 2 if has_peak else 0) for x in xs], t, width=w, label="time", color="tab:blue")
        if has_peak:
            ax.bar([x + w / 2 for x in xs], [p if p is not None else 0 for p in pk], width=w,
                   label="peak memory", color="tab:orange")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(ylabel.replace("time", "ratio"), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if has_peak:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default and minimum: k = 3)")
    ap.add_argument("--output", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "benchmarks.png"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    device = setup_device(args)
    reps = args.reps or (5 if args.quick else 7)
    warmup = max(args.warmup or CBN_K, CBN_K)
    norm_shapes = QUICK_NORM_SHAPES if args.quick else NORM_SHAPES
    pair_shapes = QUICK_PAIR_SHAPES if args.quick else PAIR_SHAPES
    t_start = time.time()
    load_before = load_note()
    print(f"{machine_line(device)}; fp32; warm-up {warmup}; median of {reps}; {load_before}")

    data = {"norm": {}, "pair": {}}
    sections = []
    for shape_name, shape in norm_shapes.items():
        res = bench_group(NORM_VARIANTS, lambda v: build_norm_variant(v, shape[1]), shape, device,
                          reps, warmup)
        data["norm"][shape_name] = res
        sections.append((f"Norm alone, {shape_name} (reference: torch `BatchNorm2d`)", table(res, NORM_VARIANTS)))
        print(f"\n{sections[-1][0]}\n{sections[-1][1]}")
        print(f"RATIO MABN official-style / d2norm MABN: "
              f"{res['MABN official-style']['ms'] / res['MABN']['ms']:.2f}x")
    for shape_name, (x_shape, conv_kw) in pair_shapes.items():
        res = bench_group(PAIR_VARIANTS, lambda v: build_pair_variant(v, conv_kw), x_shape, device,
                          reps, warmup)
        data["pair"][shape_name] = res
        sections.append((f"Conv + norm, {shape_name} (reference: conv + torch `BatchNorm2d`)",
                         table(res, PAIR_VARIANTS)))
        print(f"\n{sections[-1][0]}\n{sections[-1][1]}")
        bn = res["conv+BN (torch)"]["ms"]
        ours, ref = res["conv+CBN"]["ms"], res["conv+CBN autograd.grad ref"]["ms"]
        floor = res[CBN_FLOOR]["ms"]
        print(f"RATIO CBN autograd.grad ref / d2norm CBN: pair {ref / ours:.2f}x; overhead over conv+BN "
              f"{(ref - bn) / max(ours - bn, 1e-9):.2f}x; d2norm CBN / floor {ours / floor:.2f}x; "
              f"ref / floor {ref / floor:.2f}x")
    wall = time.time() - t_start

    cmd = "python benchmarks/layers.py" + (" --quick" if args.quick else "") + \
        (f" --device {args.device}" if args.device != "cpu" else "") + \
        (f" --threads {args.threads}" if args.threads else "")
    body = [
        "## Layers",
        "",
        f"Command: `{cmd}` (run under `nice -n 15`). Machine: {machine_line(device)}; fp32. "
        f"Date {datetime.date.today().isoformat()}; wall time {wall / 60:.1f} min; "
        f"{load_before or 'load unknown'} at the start — the machine was shared, so absolute "
        "times are noisy; variants were interleaved and the ratios are medians.",
        "",
        f"fwd+bwd in training mode, median of {reps} interleaved repetitions after {warmup} "
        f"warm-up steps (steps shorter than 30 ms timed in blocks of several). Peak MB (median of "
        f"3): "
        + ("`torch.cuda.max_memory_allocated` above the bytes allocated before the step"
           if device.type == "cuda" else
           "the running sum of the allocation / free events that `torch.profiler` "
           "(`profile_memory=True`) records during one fwd+bwd, maximum over time (what is "
           "allocated on top of the input, parameters and buffers)")
        + ". Saved MB: distinct tensors autograd keeps for backward (`saved_tensors_hooks`), "
        "excluding input, parameters and buffers. Extra state: persistent buffers beyond BN's "
        f"(CBN history of k−1 = {CBN_K - 1} iterations, MABN ring buffers of B = {MABN_BUFFER}). "
        "MABN rows are in the steady state (moving averages and renorm active). FrozenBN computes "
        "no parameter gradients, only the input gradient.",
        "",
    ]
    for title, tab in sections:
        body += [f"### {title}", "", tab, ""]
    summary = []
    for shape_name, res in data["norm"].items():
        summary.append(f"* {shape_name}: MABN official-style / d2norm MABN time "
                       f"{res['MABN official-style']['ms'] / res['MABN']['ms']:.2f}x.")
    for shape_name, res in data["pair"].items():
        bn = res["conv+BN (torch)"]["ms"]
        ours, ref = res["conv+CBN"]["ms"], res["conv+CBN autograd.grad ref"]["ms"]
        floor = res[CBN_FLOOR]["ms"]
        summary.append(f"* {shape_name}: CBN autograd.grad reference / d2norm CBN time {ref / ours:.2f}x "
                       f"(statistic overhead over conv+BN: {(ref - bn) / max(ours - bn, 1e-9):.2f}x); "
                       f"peak memory {res['conv+CBN autograd.grad ref']['peak'] / max(res['conv+CBN']['peak'], 1):.2f}x. "
                       f"d2norm CBN / CBN floor {ours / floor:.2f}x; reference / CBN floor "
                       f"{ref / floor:.2f}x, the most any exact CBN can gain over the reference here "
                       f"(a pair 3x faster than the reference would take {ref / 3 / bn:.2f}x the time "
                       "of conv + BN alone).")
    body += ["### Against the reference formulations", ""] + summary
    if not args.no_write:
        update_section(args.output, "layers", "\n".join(body),
                       {"norm": data["norm"], "pair": data["pair"], "device": str(device)})
        draw_chart(args.output, args.plot)
        print(f"\nwrote {args.output} and {args.plot} ({wall / 60:.1f} min)")
    return data


if __name__ == "__main__":
    main()
