#!/usr/bin/env python
"""Every norm layer side by side: fwd+bwd time and peak memory, as ratios to torch BatchNorm2d.

    python benchmarks/layers.py [--quick] [--device cpu|cuda] [--threads T] [--reps N]
                                [--output docs/benchmarks.md] [--plot docs/benchmarks.png]

Two groups, each run on detection-like shapes (``--quick``: smaller ones):

* **norm alone** (input = the feature map; reference ``torch.nn.BatchNorm2d``): BN, FrozenBN
  (detectron2's ``FrozenBatchNorm2d``), SyncBN in one process, GN (32 groups), MABN, and MABN in
  the official formulation (``d2norm/testing/mabn_reference.py``: a Python autograd.Function
  reading the iteration counter with ``.item()``). MABN variants run in the steady state (past
  warm-up, moving averages and the renorm clamp active).
* **conv + norm pair** (input = the conv's input; reference conv + ``nn.BatchNorm2d``), so that
  conv-side work is included: GN, GN+WS (the conv's weight standardized through its
  parametrization, recomputed every forward), CBN with its statistic gradients (window k = 3,
  windows filled during warm-up), the autograd.grad formulation of CBN
  (``d2norm/testing/cbn_reference.py``), the CBN floor (conv + BN plus the one conv weight
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

import datetime
import functools
import statistics
import time

import torch
from torch import nn

import d2norm  # noqa: F401  (must precede detectron2.layers)
from benchmarks.common import (
    DOCS_MD,
    DOCS_PNG,
    BatchNormWithNuGradient,
    command_note,
    doc_parser,
    draw_chart,
    load_note,
    mabn_steady,
    machine_line,
    median_ms,
    peak_bytes,
    setup_device,
    time_interleaved,
    update_section,
)
from d2norm.layers import (
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
from d2norm.testing.cbn_reference import ReferenceConvCBN
from d2norm.testing.mabn_reference import OfficialStyleMABN2d

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
        (2, 256, 200, 304),
        dict(in_channels=256, out_channels=256, kernel_size=3, padding=1),
    ),
    "1x1 512->2048 @ 2x512x25x38 (res5 conv3)": (
        (2, 512, 25, 38),
        dict(in_channels=512, out_channels=2048, kernel_size=1),
    ),
}
QUICK_PAIR_SHAPES = {
    "3x3 256->256 @ 2x256x50x76": (
        (2, 256, 50, 76),
        dict(in_channels=256, out_channels=256, kernel_size=3, padding=1),
    ),
    "1x1 512->2048 @ 2x512x7x10": ((2, 512, 7, 10), dict(in_channels=512, out_channels=2048, kernel_size=1)),
}
CBN_K = 3
MABN_BUFFER = 8
MABN_WARMUP = 100

NORM_VARIANTS = ["BN (torch)", "FrozenBN", "SyncBN (1 proc)", "GN", "MABN", "MABN official-style"]
# Batch Renormalization (past its ramp: r, d clipped at the full bounds), FRN + TLU, EvoNorm-S0
NEW_NORM_VARIANTS = ["BRN", "FRN", "EvoNorm-S0"]
NORM_VARIANTS += NEW_NORM_VARIANTS
CBN_FLOOR = "conv+BN+dnu/dW (CBN floor)"
PAIR_VARIANTS = [
    "conv+BN (torch)",
    "conv+GN",
    "conv+GN+WS",
    "conv+CBN",
    CBN_FLOOR,
    "conv+CBN autograd.grad ref",
    "conv+MABN (centralized conv)",
]


# ----------------------------------------------------------------------------- building
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
        return mabn_steady(MovingAverageBatchNorm2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
    if name == "MABN official-style":
        return mabn_steady(OfficialStyleMABN2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
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
        mabn = mabn_steady(MovingAverageBatchNorm2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))
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
def clear_grads(model, x):
    for p in model.parameters():
        p.grad = None
    x.grad = None


def step(model, x, g):
    clear_grads(model, x)
    model(x).backward(g)


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
    fns = {v: functools.partial(step, models[v], x, g) for v in variants}
    t_warm = {v: ts[-1] for v, ts in time_interleaved(fns, warmup, device).items()}
    # short steps are timed in blocks of several (>= ~30 ms per sample), the same for all variants
    block = max(1, min(50, int(0.03 / max(min(t_warm.values()), 1e-6))))
    times = time_interleaved(fns, reps, device, block)
    res = {}
    for v in variants:
        m = models[v]

        def fwd_bwd(m=m):
            m(x).backward(g)

        peaks = []
        for _ in range(3):  # grads cleared outside the profiled region: it frees nothing older
            clear_grads(m, x)
            peaks.append(peak_bytes(fwd_bwd, device))
        res[v] = dict(
            ms=median_ms(times[v]),
            min_ms=min(times[v]) * 1e3,
            peak=statistics.median(peaks),
            saved=saved_bytes(m, x, g),
            state=state_bytes(v, m),
            block=block,
        )
    ref = res[variants[0]]
    for v in variants:
        r = res[v]
        r["time_ratio"] = r["ms"] / ref["ms"]
        r["peak_ratio"] = r["peak"] / ref["peak"] if ref["peak"] else float("nan")
        r["saved_ratio"] = r["saved"] / ref["saved"] if ref["saved"] else float("nan")
    return res


# ----------------------------------------------------------------------------- reporting
def _mb(b):
    return f"{b / 2**20:.1f}"


def table(res, variants):
    lines = [
        "| variant | median ms | time vs ref | peak MB | peak vs ref | saved MB | extra state KB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        r = res[v]
        lines.append(
            f"| {v} | {r['ms']:.1f} | {r['time_ratio']:.2f}x | {_mb(r['peak'])} | "
            f"{r['peak_ratio']:.2f}x | {_mb(r['saved'])} | {r['state'] / 1024:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = doc_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default and minimum: k = 3)")
    ap.add_argument("--output", default=DOCS_MD)
    ap.add_argument("--plot", default=DOCS_PNG)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only these variants (and each group's reference); implies --no-write",
    )
    ap.add_argument(
        "--groups", nargs="+", default=["norm", "pair"], choices=["norm", "pair"], help="groups to run"
    )
    args = ap.parse_args(argv)
    norm_variants, pair_variants = NORM_VARIANTS, PAIR_VARIANTS
    if args.variants or set(args.groups) != {"norm", "pair"}:
        args.no_write = True  # a partial table never replaces the committed section
    if args.variants:
        unknown = set(args.variants) - set(NORM_VARIANTS) - set(PAIR_VARIANTS)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; choose from {NORM_VARIANTS + PAIR_VARIANTS}")
        norm_variants = NORM_VARIANTS[:1] + [v for v in NORM_VARIANTS[1:] if v in args.variants]
        pair_variants = PAIR_VARIANTS[:1] + [v for v in PAIR_VARIANTS[1:] if v in args.variants]
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
    for shape_name, shape in norm_shapes.items() if "norm" in args.groups else ():
        res = bench_group(
            norm_variants, functools.partial(build_norm_variant, c=shape[1]), shape, device, reps, warmup
        )
        data["norm"][shape_name] = res
        sections.append(
            (f"Norm alone, {shape_name} (reference: torch `BatchNorm2d`)", table(res, norm_variants))
        )
        print(f"\n{sections[-1][0]}\n{sections[-1][1]}")
        if {"MABN", "MABN official-style"} <= set(res):
            print(
                f"RATIO MABN official-style / d2norm MABN: "
                f"{res['MABN official-style']['ms'] / res['MABN']['ms']:.2f}x"
            )
    for shape_name, (x_shape, conv_kw) in pair_shapes.items() if "pair" in args.groups else ():
        build = functools.partial(build_pair_variant, conv_kw=conv_kw)
        res = bench_group(pair_variants, build, x_shape, device, reps, warmup)
        data["pair"][shape_name] = res
        sections.append(
            (f"Conv + norm, {shape_name} (reference: conv + torch `BatchNorm2d`)", table(res, pair_variants))
        )
        print(f"\n{sections[-1][0]}\n{sections[-1][1]}")
        if {"conv+CBN", CBN_FLOOR} <= set(res):
            print(f"RATIO d2norm CBN / floor {res['conv+CBN']['ms'] / res[CBN_FLOOR]['ms']:.2f}x")
        if {"conv+CBN", CBN_FLOOR, "conv+CBN autograd.grad ref"} <= set(res):
            bn = res["conv+BN (torch)"]["ms"]
            ours, ref = res["conv+CBN"]["ms"], res["conv+CBN autograd.grad ref"]["ms"]
            print(
                f"RATIO CBN autograd.grad ref / d2norm CBN: pair {ref / ours:.2f}x; overhead over "
                f"conv+BN {(ref - bn) / max(ours - bn, 1e-9):.2f}x; ref / floor "
                f"{ref / res[CBN_FLOOR]['ms']:.2f}x"
            )
    if args.no_write:
        print(f"\n({(time.time() - t_start) / 60:.1f} min; not written)")
        return data
    wall = time.time() - t_start

    cmd = (
        "python benchmarks/layers.py"
        + (" --quick" if args.quick else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --threads {args.threads}" if args.threads else "")
    )
    body = [
        "## Layers",
        "",
        f"{command_note(cmd)}. Machine: {machine_line(device)}; fp32. "
        f"Date {datetime.date.today().isoformat()}; wall time {wall / 60:.1f} min; "
        f"{load_before or 'load unknown'} at the start — the machine was shared, so absolute "
        "times are noisy; variants were interleaved and the ratios are medians.",
        "",
        f"fwd+bwd in training mode, median of {reps} interleaved repetitions after {warmup} "
        f"warm-up steps (steps shorter than 30 ms timed in blocks of several). Peak MB (median of "
        f"3): "
        + (
            "`torch.cuda.max_memory_allocated` above the bytes allocated before the step"
            if device.type == "cuda"
            else "the running sum of the allocation / free events that `torch.profiler` "
            "(`profile_memory=True`) records during one fwd+bwd, maximum over time (what is "
            "allocated on top of the input, parameters and buffers)"
        )
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
        summary.append(
            f"* {shape_name}: MABN official-style / d2norm MABN time "
            f"{res['MABN official-style']['ms'] / res['MABN']['ms']:.2f}x."
        )
    for shape_name, res in data["pair"].items():
        bn = res["conv+BN (torch)"]["ms"]
        ours, ref = res["conv+CBN"]["ms"], res["conv+CBN autograd.grad ref"]["ms"]
        floor = res[CBN_FLOOR]["ms"]
        summary.append(
            f"* {shape_name}: CBN autograd.grad reference / d2norm CBN time {ref / ours:.2f}x "
            f"(statistic overhead over conv+BN: {(ref - bn) / max(ours - bn, 1e-9):.2f}x); "
            "peak memory "
            f"{res['conv+CBN autograd.grad ref']['peak'] / max(res['conv+CBN']['peak'], 1):.2f}x. "
            f"d2norm CBN / CBN floor {ours / floor:.2f}x; reference / CBN floor "
            f"{ref / floor:.2f}x, the most any exact CBN can gain over the reference here "
            f"(a pair 3x faster than the reference would take {ref / 3 / bn:.2f}x the time "
            "of conv + BN alone)."
        )
    body += ["### Against the reference formulations", ""] + summary
    if not args.no_write:
        update_section(
            args.output,
            "layers",
            "\n".join(body),
            {"norm": data["norm"], "pair": data["pair"], "device": str(device)},
        )
        draw_chart(args.output, args.plot)
        print(f"\nwrote {args.output} and {args.plot} ({wall / 60:.1f} min)")
    return data


if __name__ == "__main__":
    main()
