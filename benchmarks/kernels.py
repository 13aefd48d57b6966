#!/usr/bin/env python
"""ATen ops per conv + norm pair: how many kernels one training step of each norm launches.

    python benchmarks/kernels.py [--device cpu|cuda] [--threads T] [--reps N] [--no-time]
                                 [--output docs/benchmarks.md] [--plot docs/benchmarks.png]

On a GPU a small training step is launch-bound: its time follows the number of kernels, not the
arithmetic. This script counts, with a ``TorchDispatchMode``, every ATen op dispatched by one
steady-state training step of a 3x3 conv 64->64 (no bias) followed by the norm on a 2x64x16x16
input: forward, ``y.sum()``, backward (the parameter gradients cleared before the step). The
count is deterministic (a property of the code, not a timing), so it is measured on the CPU and
holds on any device up to the backend's choice of fused kernels.

Ops are split in two:

* **kernel ops**: ops that compute (launch a kernel on a GPU): arithmetic, reductions, copies,
  fills, in-place updates, convolutions, and ``_local_scalar_dense`` (a host read, a
  device-to-host sync on a GPU; also counted in its own column);
* **no-kernel ops**: ops that only make a tensor header: views and aliases (``view``,
  ``reshape`` views, ``slice``, ``select``, ``expand``, ``permute``, ``t``, ``unsqueeze``,
  ``detach``, ``alias``, any op whose schema returns an alias of an input without writing it)
  and allocations (``empty*``, ``new_empty*``).

Rows (steady state: CBN after burn-in with a full window, k = 4; MABN past warm-up and the
renorm threshold, B = 16, ring buffers filled): every d2norm norm, the CBN floor (conv + BN + the
one dnu/dW weight gradient any exact CBN computes), the reference formulations of CBN
(autograd.grad, ``d2norm.testing.cbn_reference``) and MABN (official-style ``.item()``
autograd.Function, ``d2norm.testing.mabn_reference``, after the same centralized conv). A second
table counts the conv side alone (conv + GN): a plain conv, d2norm's weight-standardized conv
(both conventions), MABN's centralized conv and, when the ``timm`` package is installed (an
optional, benchmark-only extra: ``pip install timm``), timm's ``StdConv2d`` and
``ScaledStdConv2d``; they are also timed side by side (fwd+bwd, interleaved, medians) at the
detection shapes of ``benchmarks/layers.py``'s res5 pair and at the counting shape.

The script writes (replaces) the "Kernels" section of ``--output``.
"""

import collections
import datetime
import functools
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import d2norm  # noqa: F401  (must precede detectron2.layers)
from benchmarks.common import (
    DOCS_MD,
    BatchNormWithNuGradient,
    command_note,
    doc_parser,
    load_note,
    mabn_steady,
    machine_line,
    median_ms,
    setup_device,
    time_interleaved,
    update_section,
)
from d2norm.layers import (
    BatchChannelNormWS,
    BatchNormWS,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    EvoNormS0,
    FilterResponseNorm2d,
    GroupNorm,
    GroupNormWS,
    MovingAverageBatchNorm2d,
    SyncBatchNorm2d,
)
from d2norm.layers.weight_transforms import (
    WeightCentralization,
    WeightStandardization,
    apply_weight_transform,
    release_transformed_weight,
)
from d2norm.testing.cbn_reference import ReferenceConvCBN
from d2norm.testing.mabn_reference import OfficialStyleMABN2d

try:  # optional, benchmark-only peer
    from timm.layers import ScaledStdConv2d, StdConv2d
except ImportError:  # pragma: no cover - depends on the environment
    StdConv2d = ScaledStdConv2d = None

COUNT_INPUT = (2, 64, 16, 16)
COUNT_CONV = dict(in_channels=64, out_channels=64, kernel_size=3, padding=1)
CBN_K = 4
MABN_BUFFER = 16
MABN_WARMUP = 100

# ----------------------------------------------------------------------------- counting
_NO_KERNEL_NAMES = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "_reshape_alias",
    "view",
}
SYNC_NAMES = {"_local_scalar_dense"}


def op_name(func):
    """``aten.add_.Tensor`` -> ``add_``."""
    return func._schema.name.split("::", 1)[-1]


def launches_kernel(func):
    """False for ops that only create a tensor header (views, aliases, allocations)."""
    name = op_name(func)
    if name in _NO_KERNEL_NAMES:
        return False
    rets = func._schema.returns
    # a view: every output aliases an input and nothing is written
    if rets and all(r.alias_info is not None and not r.alias_info.is_write for r in rets):
        return False
    return True


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (``ops``: OpOverload -> calls)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1
        return func(*args, **(kwargs or {}))

    def summary(self):
        kernel = {f: n for f, n in self.ops.items() if launches_kernel(f)}
        other = {f: n for f, n in self.ops.items() if not launches_kernel(f)}
        syncs = sum(n for f, n in self.ops.items() if op_name(f) in SYNC_NAMES)
        return dict(
            kernel=sum(kernel.values()),
            no_kernel=sum(other.values()),
            syncs=syncs,
            kernel_ops=_by_name(kernel),
            no_kernel_ops=_by_name(other),
        )


def _by_name(ops):
    out = collections.Counter()
    for f, n in ops.items():
        out[op_name(f)] += n
    return dict(sorted(out.items()))


def _clear_grads(model, x):
    for p in model.parameters():
        p.grad = None
    x.grad = None


def count_step(model, x):
    """Ops of one training step ``model(x).sum().backward()`` (grads cleared before, uncounted)."""
    _clear_grads(model, x)
    with OpCounter() as counter:
        model(x).sum().backward()
    return counter.summary()


# ----------------------------------------------------------------------------- variants
def _conv(kw):
    torch.manual_seed(0)
    return nn.Conv2d(bias=False, **kw)


def _steady_cbn(model, x, k):
    for _ in range(k):  # fill the window (burn-in 0: history recorded from the first step)
        _clear_grads(model, x)
        model(x).sum().backward()
    return model


def _warm(model, x, steps=2):
    """Run untimed, uncounted steps (lazy allocations, caches, CBN windows)."""
    for _ in range(steps):
        _clear_grads(model, x)
        model(x).sum().backward()
    return model


def _prepared(conv, norm):
    norm.prepare_preceding_conv(conv)
    return nn.Sequential(conv, norm)


def _mabn(c):
    return mabn_steady(MovingAverageBatchNorm2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))


def _mabn_official(c):
    return mabn_steady(OfficialStyleMABN2d(c, buffer_size=MABN_BUFFER, warmup_iters=MABN_WARMUP))


def _centralized(conv):
    return apply_weight_transform(conv, WeightCentralization())


CBN_FLOOR = "conv+BN+dnu/dW (CBN floor)"


def build_pair(name, kw=COUNT_CONV):
    """The conv + norm pair ``name`` (fresh, seeded); CBN / MABN rows not yet in steady state."""
    from detectron2.layers import FrozenBatchNorm2d

    conv, c = _conv(kw), kw["out_channels"]
    builders = {
        "conv+BN (torch)": lambda: nn.Sequential(conv, nn.BatchNorm2d(c)),
        "conv+FrozenBN": lambda: nn.Sequential(conv, FrozenBatchNorm2d(c)),
        "conv+SyncBN (1 proc)": lambda: nn.Sequential(conv, SyncBatchNorm2d(c)),
        "conv+GN": lambda: nn.Sequential(conv, GroupNorm(32, c)),
        "conv+GN+WS": lambda: _prepared(conv, GroupNormWS(32, c)),
        "conv+BCN+WS": lambda: _prepared(conv, BatchChannelNormWS(c, num_groups=32)),
        "conv+BN+WS": lambda: _prepared(conv, BatchNormWS(c)),
        "conv+CBN": lambda: nn.Sequential(conv, CrossIterationBatchNorm2d(c, buffer_size=CBN_K).bind(conv)),
        CBN_FLOOR: lambda: BatchNormWithNuGradient(conv, nn.BatchNorm2d(c)),
        "conv+CBN autograd.grad ref": lambda: ReferenceConvCBN(conv, buffer_size=CBN_K),
        "conv+MABN": lambda: nn.Sequential(conv, _mabn(c)),
        "conv+MABN official-style": lambda: nn.Sequential(conv, _mabn_official(c)),
        "centralized conv+MABN": lambda: _prepared(conv, _mabn(c)),
        "centralized conv+MABN official-style": lambda: nn.Sequential(_centralized(conv), _mabn_official(c)),
        "conv+BRN": lambda: nn.Sequential(conv, _brn_steady(BatchRenorm2d(c))),
        "conv+FRN": lambda: nn.Sequential(conv, FilterResponseNorm2d(c)),
        "conv+EvoNorm-S0": lambda: nn.Sequential(conv, EvoNormS0(c, num_groups=32)),
    }
    return builders[name]()


PAIR_ROWS = [
    "conv+BN (torch)",
    "conv+FrozenBN",
    "conv+SyncBN (1 proc)",
    "conv+GN",
    "conv+GN+WS",
    "conv+BCN+WS",
    "conv+BN+WS",
    "conv+CBN",
    CBN_FLOOR,
    "conv+CBN autograd.grad ref",
    "conv+MABN",
    "conv+MABN official-style",
    "centralized conv+MABN",
    "centralized conv+MABN official-style",
    "conv+BRN",
    "conv+FRN",
    "conv+EvoNorm-S0",
]


def _brn_steady(brn):
    brn.iters.fill_(brn.r_max_end)  # past the ramp (same work at every step)
    return brn


def timm_available():
    return StdConv2d is not None


def _timm_args(kw):
    return kw["in_channels"], kw["out_channels"], kw["kernel_size"], 1, kw.get("padding", 0)


class _GroupNormAfterTransform(GroupNorm):
    """GN that, like d2norm's norms after a transformed conv (GN+WS, BN+WS, MABN), has the
    conv's transformed weight rebuilt in backward instead of kept."""

    def forward(self, x):
        release_transformed_weight(x)
        return super().forward(x)


def build_conv(name, kw):
    """The conv side alone: conv ``name`` followed by GN (32 groups)."""
    c = kw["out_channels"]
    torch.manual_seed(0)
    if name == "plain conv":
        conv = nn.Conv2d(bias=False, **kw)
    elif name == "d2norm WS conv (sqrt_var)":
        conv = apply_weight_transform(nn.Conv2d(bias=False, **kw), WeightStandardization(1e-5, "sqrt_var"))
    elif name == "d2norm WS conv (std_plus_eps)":
        conv = apply_weight_transform(
            nn.Conv2d(bias=False, **kw), WeightStandardization(1e-5, "std_plus_eps")
        )
    elif name == "d2norm centralized conv (MABN)":
        conv = _centralized(nn.Conv2d(bias=False, **kw))
    elif name == "timm StdConv2d":
        conv = StdConv2d(*_timm_args(kw), bias=False, eps=1e-5)
    elif name == "timm ScaledStdConv2d":
        conv = ScaledStdConv2d(*_timm_args(kw), bias=False, eps=1e-5)
    else:
        raise KeyError(name)
    norm = _GroupNormAfterTransform if name.startswith("d2norm") else GroupNorm
    return nn.Sequential(conv, norm(32, c))


CONV_ROWS = [
    "plain conv",
    "d2norm WS conv (sqrt_var)",
    "d2norm WS conv (std_plus_eps)",
    "d2norm centralized conv (MABN)",
]
TIMM_ROWS = ["timm StdConv2d", "timm ScaledStdConv2d"]

# name: (conv input shape, conv kwargs) for timing the conv side
CONV_TIME_SHAPES = {
    "3x3 64->64 @ 2x64x16x16": (COUNT_INPUT, COUNT_CONV),
    "1x1 512->2048 @ 2x512x25x38 (res5 conv3)": (
        (2, 512, 25, 38),
        dict(in_channels=512, out_channels=2048, kernel_size=1),
    ),
}


def _input(shape, device):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device).requires_grad_(True)


def count_pair(name, device="cpu"):
    """Ops of one steady-state training step of the pair ``name`` at the counting shape."""
    x = _input(COUNT_INPUT, device)
    model = build_pair(name).to(device).train()
    _warm(model, x, steps=CBN_K + 1)  # a full CBN window; MABN stays in its steady state
    return count_step(model, x)


def count_conv(name, device="cpu"):
    x = _input(COUNT_INPUT, device)
    model = _warm(build_conv(name, COUNT_CONV).to(device).train(), x)
    return count_step(model, x)


def _fwd_bwd(model, x, g):
    _clear_grads(model, x)
    model(x).backward(g)


def time_convs(rows, device, reps, warmup=2):
    """fwd+bwd ms (median, interleaved) of each conv side at each timing shape."""
    out = {}
    for shape_name, (x_shape, kw) in CONV_TIME_SHAPES.items():
        x = _input(x_shape, device)
        models = {r: build_conv(r, kw).to(device).train() for r in rows}
        with torch.no_grad():
            g = torch.randn_like(models[rows[0]](x))
        fns = {r: functools.partial(_fwd_bwd, m, x, g) for r, m in models.items()}
        t_warm = {r: ts[-1] for r, ts in time_interleaved(fns, warmup, device).items()}
        block = max(1, min(50, int(0.03 / max(min(t_warm.values()), 1e-6))))
        times = time_interleaved(fns, reps, device, block)
        ref = median_ms(times[rows[0]])
        out[shape_name] = {r: dict(ms=median_ms(times[r]), ratio=median_ms(times[r]) / ref) for r in rows}
    return out


# ----------------------------------------------------------------------------- report
def _ops_line(ops):
    return ", ".join(f"{k} {v}" if v > 1 else k for k, v in ops.items())


def markdown(pairs, convs, conv_times, timm_note, head):
    base = pairs["conv+BN (torch)"]["kernel"]
    lines = [
        "## Kernels",
        "",
        head,
        "",
        "ATen ops of one steady-state training step (forward, `y.sum()`, backward; parameter "
        "gradients cleared before it) of a 3x3 conv 64->64 (no bias) + norm on a 2x64x16x16 input, "
        "counted with a `TorchDispatchMode` on the CPU. Kernel ops compute (on a GPU each launches "
        "a kernel; host reads `_local_scalar_dense` are also a device-to-host sync); no-kernel ops "
        "only make a tensor header (views, aliases, `detach`, `empty*`). Deterministic: a test "
        "(`tests/test_kernel_counts.py`) fails if CBN's or MABN's count grows. CBN: window k = 4, "
        "after burn-in, window full. MABN: B = 16, past warm-up and the renorm threshold.",
        "",
        "### Conv + norm pair",
        "",
        "| variant | kernel ops | vs conv+BN | no-kernel ops | host syncs | kernel ops |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r, s in pairs.items():
        lines.append(
            f"| {r} | {s['kernel']} | {s['kernel'] - base:+d} | {s['no_kernel']} | {s['syncs']} | "
            f"{_ops_line(s['kernel_ops'])} |"
        )
    plain = convs["plain conv"]["kernel"]
    lines += [
        "",
        "### Conv side: conv + GN",
        "",
        "The same step with GN (32 groups) after each conv, so the difference to the plain conv is "
        "the weight transform's cost. " + timm_note,
        "",
        "| conv | kernel ops | vs plain conv | no-kernel ops | kernel ops |",
        "|---|---:|---:|---:|---|",
    ]
    for r, s in convs.items():
        lines.append(
            f"| {r} | {s['kernel']} | {s['kernel'] - plain:+d} | {s['no_kernel']} | "
            f"{_ops_line(s['kernel_ops'])} |"
        )
    if not conv_times:
        lines += ["", "The conv side was not timed in this run (`--no-time`)."]
    else:
        rows = list(next(iter(conv_times.values())))
        lines += [
            "",
            "Conv side timed (conv + GN fwd+bwd, median of the interleaved repetitions; ratio to "
            "the plain conv):",
            "",
            "| conv | " + " | ".join(conv_times) + " |",
            "|---|" + "---:|" * len(conv_times),
        ]
        for r in rows:
            cells = [f"{conv_times[s][r]['ms']:.2f} ms, {conv_times[s][r]['ratio']:.2f}x" for s in conv_times]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = doc_parser(__doc__)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (counts are the same; times differ)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions of the conv side")
    ap.add_argument("--no-time", action="store_true", help="counts only (no conv-side timing)")
    ap.add_argument("--output", default=DOCS_MD)
    ap.add_argument("--plot", default=None, help="unused (the counts have no chart); accepted for symmetry")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    device = setup_device(args)
    t0 = time.time()
    load = load_note()
    pairs = {r: count_pair(r, device) for r in PAIR_ROWS}
    conv_rows = CONV_ROWS + (TIMM_ROWS if timm_available() else [])
    convs = {r: count_conv(r, device) for r in conv_rows}
    if timm_available():
        import timm

        timm_note = f"timm {timm.__version__} (`pip install timm`, benchmark-only)."
    else:
        timm_note = "timm is not installed (`pip install timm`): its rows are skipped."
        print("timm not installed: skipping the timm StdConv2d / ScaledStdConv2d rows (pip install timm)")
    conv_times = None if args.no_time else time_convs(conv_rows, device, args.reps)
    cmd = "python benchmarks/kernels.py" + (f" --device {args.device}" if device.type != "cpu" else "")
    if args.threads:
        cmd += f" --threads {args.threads}"
    if args.no_time:
        cmd += " --no-time"
    head = (
        f"{command_note(cmd)}. Machine: {machine_line(device)}; fp32. Date "
        f"{datetime.date.today().isoformat()}; wall time {(time.time() - t0) / 60:.1f} min; {load} "
        "at the start."
    )
    body = markdown(pairs, convs, conv_times, timm_note, head)
    print(body)
    if not args.no_write:
        data = dict(pairs={r: {k: s[k] for k in ("kernel", "no_kernel", "syncs")} for r, s in pairs.items()})
        data["convs"] = {r: {k: s[k] for k in ("kernel", "no_kernel", "syncs")} for r, s in convs.items()}
        if conv_times:
            data["conv_times"] = conv_times
        data["device"] = device.type
        update_section(args.output, "kernels", body, data)
    return pairs, convs, conv_times


if __name__ == "__main__":
    main()
