"""Speed of conv + CrossIterationBatchNorm2d (analytic statistic gradients) vs the autograd.grad
formulation of the official code (d2norm/testing/cbn_reference.py) vs conv + nn.BatchNorm2d.

    python benchmarks/cbn_speed.py [--quick] [--device cuda] [--reps N] [--threads T]

Each variant runs fwd+bwd of the conv+norm pair on the same inputs and upstream gradients, with
the same thread count; the variants alternate within each repetition (after warm-up, which also
fills the CBN windows), and the table shows the median. "stat overhead" is the time above conv+BN.
On a machine shared with other jobs, ``--threads 1`` gives far steadier numbers than an
oversubscribed thread pool.

Bound on the ratios: any exact CBN must compute dnu/dW, one full conv weight gradient (about a
third of the conv's fwd+bwd); the analytic form removes the second one (dmu/dW via autograd) and the
autograd bookkeeping. The variant "conv+BN+dnu/dW (CBN floor)" is that floor: conv + BN plus the one weight
gradient and nothing else. "ref / floor" is the most any CBN implementation can gain over the
autograd.grad formulation on that shape; "ours / floor" is how far this implementation is from it.
"""

import argparse
import functools

import torch
from torch import nn

from benchmarks.common import (
    BatchNormWithNuGradient,
    machine_line,
    median_ms,
    setup_device,
    time_interleaved,
)
from benchmarks.layers import CBN_FLOOR as FLOOR
from d2norm.layers.cross_iteration_batch_norm import CrossIterationBatchNorm2d, conv_statistic_gradients
from d2norm.testing.cbn_reference import ReferenceConvCBN

SHAPES = {  # name: (input N, C, H, W), conv kwargs
    "3x3 256->256 @ 2x256x64x64": (
        (2, 256, 64, 64),
        dict(in_channels=256, out_channels=256, kernel_size=3, padding=1),
    ),
    "1x1 1024->256 @ 2x1024x25x38": (
        (2, 1024, 25, 38),
        dict(in_channels=1024, out_channels=256, kernel_size=1),
    ),
}
QUICK_SHAPES = {
    "3x3 256->256 @ 2x256x32x32": (
        (2, 256, 32, 32),
        dict(in_channels=256, out_channels=256, kernel_size=3, padding=1),
    ),
    "1x1 1024->256 @ 2x1024x25x38": SHAPES["1x1 1024->256 @ 2x1024x25x38"],
}


def build(variant, conv_kw, k, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(bias=False, **conv_kw).to(device)
    c = conv_kw["out_channels"]
    if variant == "conv+BN":
        return nn.Sequential(conv, nn.BatchNorm2d(c).to(device))
    if variant == FLOOR:
        return BatchNormWithNuGradient(conv, nn.BatchNorm2d(c).to(device))
    if variant == "conv+CBN (ours)":
        cbn = CrossIterationBatchNorm2d(c, buffer_size=k).to(device)
        cbn.bind(conv)
        return nn.Sequential(conv, cbn)
    return ReferenceConvCBN(conv, buffer_size=k).to(device)


def step(model, x, g):
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).backward(g)


def analytic_stat_grads(conv, x, y):
    """What CrossIterationBatchNorm2d computes per recorded iteration: dnu/dW and pbar."""
    with torch.no_grad():
        return conv_statistic_gradients(conv, x, y)


def autograd_stat_grads(conv, x):
    """The official formulation: two autograd.grad calls on mu(W), nu(W) (graph built here)."""
    w = conv.weight
    y = torch.nn.functional.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    mu, nu = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
    ones = torch.ones_like(mu)
    dmu = torch.autograd.grad(mu, w, ones, retain_graph=True)[0]
    dnu = torch.autograd.grad(nu, w, ones, retain_graph=True)[0]
    return dmu, dnu


def history_bytes(variant, model):
    if variant == "conv+CBN (ours)":
        return sum(b.numel() * b.element_size() for n, b in model[1].named_buffers() if n.startswith("hist_"))
    if variant == "autograd.grad ref":
        return sum(t.numel() * t.element_size() for entry in model.history for t in entry)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller 3x3 input, fewer repetitions")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--buffer-size", type=int, default=3)
    args = ap.parse_args()
    device = setup_device(args)
    reps = args.reps or (3 if args.quick else 7)
    warmup = max(args.warmup or (2 if args.quick else 3), args.buffer_size)  # fill the windows
    shapes = QUICK_SHAPES if args.quick else SHAPES
    variants = ["conv+BN", FLOOR, "conv+CBN (ours)", "autograd.grad ref"]
    print(
        f"{machine_line(device)}; fp32, buffer_size k={args.buffer_size}, warm-up {warmup}, "
        f"median of {reps} reps"
    )

    for name, (in_shape, conv_kw) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(in_shape, generator=gen).to(device).requires_grad_(True)
        models = {v: build(v, conv_kw, args.buffer_size, device).train() for v in variants}
        with torch.no_grad():
            out_shape = models["conv+BN"](x).shape
        g = torch.randn(out_shape, generator=gen).to(device)
        for _ in range(warmup):
            for v in variants:
                step(models[v], x, g)
        conv = models["conv+BN"][0]
        xd = x.detach()
        with torch.no_grad():
            yd = conv(xd)
        stat_fns = {  # statistic gradients alone; the autograd one includes its conv forward
            "analytic": functools.partial(analytic_stat_grads, conv, xd, yd),
            "autograd.grad": functools.partial(autograd_stat_grads, conv, xd),
            "conv fwd": functools.partial(
                torch.nn.functional.conv2d,
                xd,
                conv.weight,
                None,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            ),
        }
        for f in stat_fns.values():
            f()
        fns = {v: functools.partial(step, models[v], x, g) for v in variants}
        times = time_interleaved({**fns, **stat_fns}, reps, device)
        med = {v: median_ms(ts) for v, ts in times.items()}
        best = {v: min(ts) * 1e3 for v, ts in times.items()}
        bn = med["conv+BN"]
        print(f"\n{name}  (fwd+bwd of the conv+norm pair)")
        print(
            f"  {'variant':<20} {'median ms':>10} {'(min ms)':>9} {'vs conv+BN':>11} {'stat overhead ms':>17}"
        )
        for v in variants:
            print(f"  {v:<20} {med[v]:>10.2f} {best[v]:>9.2f} {med[v] / bn:>10.2f}x {med[v] - bn:>17.2f}")
        ours, ref = med["conv+CBN (ours)"], med["autograd.grad ref"]
        ovh_ours, ovh_ref = ours - bn, ref - bn
        floor = med[FLOOR]
        print(f"  RATIO pair time, autograd.grad ref / ours: {ref / ours:.2f}x")
        print(
            f"  RATIO pair time, ours / floor ({FLOOR}): {ours / floor:.2f}x; autograd.grad ref / "
            f"floor: {ref / floor:.2f}x (the most any exact CBN can gain over the reference here)"
        )
        print(
            f"  a pair {3:d}x faster than the reference would take {ref / 3:.2f} ms: "
            f"{ref / 3 / bn:.2f}x of conv+BN alone ({bn:.2f} ms)"
        )
        if ovh_ours > 0:
            print(f"  RATIO statistic-gradient overhead over conv+BN, ref / ours: {ovh_ref / ovh_ours:.2f}x")
        st_ref = med["autograd.grad"] - med["conv fwd"]
        print(
            f"  statistic gradients alone: analytic {med['analytic']:.2f} ms, autograd.grad "
            f"{st_ref:.2f} ms (+{med['conv fwd']:.2f} ms for the graph's conv forward)"
        )
        print(f"  RATIO statistic gradients alone, autograd.grad / analytic: {st_ref / med['analytic']:.2f}x")
        w_bytes = models["conv+BN"][0].weight.numel() * 4
        for v in ("conv+CBN (ours)", "autograd.grad ref"):
            hb = history_bytes(v, models[v])
            print(
                f"  history memory {v:<18}: {hb:>11,d} B = {hb / w_bytes:.3f} x |W| "
                f"(|W| = {w_bytes:,d} B fp32)"
            )


if __name__ == "__main__":
    main()
