"""Speed of MovingAverageBatchNorm2d (fwd+bwd, training) vs an official-style MABN and torch BN.

    python benchmarks/mabn_speed.py [--quick] [--device cpu|cuda] [--threads N]

For each shape, three layers run side by side on the same input and output gradient, in the
steady state (past warm-up and the renorm threshold):

* ``ours``      d2norm.layers.MovingAverageBatchNorm2d (no host reads; branches on a host mirror of the count)
* ``official``  the official formulation (d2norm/testing/mabn_reference.py): a Python
                autograd.Function that reads the iteration counter with ``.item()`` and
                branches in Python
* ``torch_bn``  torch.nn.BatchNorm2d in training mode

Each timed sample is a block of ``--block`` fwd+bwd steps with one synchronization at its end
(so a per-layer ``.item()`` stalls the CPU's run-ahead on GPU as it would in training); the
methods are interleaved and the median per-step time is reported. On CPU ``.item()`` is just a
memory read, so there the comparison measures only the arithmetic of the formulations.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from benchmarks.common import mabn_steady, machine_line, sync
from d2norm.layers.moving_average_batch_norm import MovingAverageBatchNorm2d
from d2norm.testing.mabn_reference import OfficialStyleMABN2d


def _make_layers(C, device, buffer_size, warmup):
    ours = mabn_steady(MovingAverageBatchNorm2d(C, buffer_size=buffer_size, warmup_iters=warmup))
    official = mabn_steady(OfficialStyleMABN2d(C, buffer_size=buffer_size, warmup_iters=warmup))
    bn = nn.BatchNorm2d(C)
    return {"ours": ours.to(device), "official": official.to(device), "torch_bn": bn.to(device)}


def bench_shape(shape, device, dtype, block, repeats, warmup_blocks, buffer_size, warmup):
    N, C, H, W = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    layers = _make_layers(C, device, buffer_size, warmup)

    def run_block(layer):
        for _ in range(block):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)

    times = {k: [] for k in layers}
    for _ in range(warmup_blocks):
        for layer in layers.values():
            run_block(layer)
    sync(device)
    for _ in range(repeats):
        for name, layer in layers.items():
            sync(device)
            t0 = time.perf_counter()
            run_block(layer)
            sync(device)
            times[name].append((time.perf_counter() - t0) / block * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--block", type=int, default=None, help="fwd+bwd steps per timed sample")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per method")
    p.add_argument("--buffer-size", type=int, default=16)
    p.add_argument("--warmup-iters", type=int, default=100)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        shapes = [(2, 64, 50, 76), (2, 256, 13, 19)]
        block, repeats, warmup_blocks = args.block or 3, args.repeats or 5, 1
    else:
        shapes = [(2, 256, 100, 152), (2, 1024, 25, 38)]
        block = args.block or (20 if device.type == "cuda" else 5)
        repeats, warmup_blocks = args.repeats or 15, 2

    print(
        f"{machine_line(device)}; dtype {args.dtype}, "
        f"buffer_size {args.buffer_size}, {repeats} samples x {block} steps, median ms per fwd+bwd"
    )
    header = (
        f"{'shape':<22}{'ours':>10}{'official':>10}{'torch_bn':>10}{'official/ours':>15}{'ours/torch_bn':>15}"
    )
    print(header)
    print("-" * len(header))
    for shape in shapes:
        r = bench_shape(
            shape, device, dtype, block, repeats, warmup_blocks, args.buffer_size, args.warmup_iters
        )
        print(
            f"{str(shape):<22}{r['ours']:>10.3f}{r['official']:>10.3f}{r['torch_bn']:>10.3f}"
            f"{r['official'] / r['ours']:>14.2f}x{r['ours'] / r['torch_bn']:>14.2f}x"
        )


if __name__ == "__main__":
    main()
