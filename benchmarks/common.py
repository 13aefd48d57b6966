"""What every benchmark script shares: devices and machine description, interleaved timing,
peak memory, the Markdown report sections and chart, and the variants several scripts time
(the CBN floor, MABN in its steady state).

Machine facts are measured when a script runs (CPU model from /proc/cpuinfo, the cores this
process may use, torch threads, load average), never written down.
"""

import argparse
import contextlib
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

from d2norm.layers.cross_iteration_batch_norm import conv_nu_weight_gradient  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_MD = os.path.join(ROOT, "docs", "benchmarks.md")
DOCS_PNG = os.path.join(ROOT, "docs", "benchmarks.png")


# ----------------------------------------------------------------------------- device, machine
def doc_parser(doc):
    """An ``ArgumentParser`` whose description is the first paragraph of a script's docstring and
    whose epilog is the rest."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup_device(args):
    """The torch device of ``args.device`` (exits if CUDA is asked for but absent); applies
    ``args.threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return device


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def machine_line(device):
    """One line describing where the numbers were measured (all read at run time)."""
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
        dev = f"{dev}, {usable_cores()} usable core(s) of {os.cpu_count()}"
    return (
        f"{dev}; torch {torch.__version__}; {torch.get_num_threads()} thread(s); "
        f"Python {platform.python_version()}"
    )


def command_note(cmd):
    """The "Command: `cmd`" text, with the process's niceness where it was raised (read at run time)."""
    try:
        niceness = os.nice(0)
    except OSError:
        niceness = 0
    return f"Command: `{cmd}`" + (f" (run under `nice -n {niceness}`)" if niceness > 0 else "")


def load_note():
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return ""


# ----------------------------------------------------------------------------- time, memory
def time_interleaved(fns, reps, device, block=1):
    """Seconds per call of each ``fns[name]()``: ``reps`` rounds, the functions alternating
    within each round (A, B, C, A, B, C, ...) so that a load change hits all alike; each sample
    times ``block`` calls with one synchronization at its end. Returns ``{name: [seconds]}``."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / block)
    return times


def median_ms(samples):
    return statistics.median(samples) * 1e3


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
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    run = peak = 0
    for _, n in events:
        run += n
        peak = max(peak, run)
    return peak


# ----------------------------------------------------------------------------- shared variants
class BatchNormWithNuGradient(nn.Module):
    """conv + BN that also computes dnu/dW (one conv weight gradient for grad_output 2y/M) per
    training forward: the least work any exact CBN adds to conv + BN (the "CBN floor")."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            with torch.no_grad():
                conv_nu_weight_gradient(self.conv, x.detach(), y.detach())
        return self.bn(y)


def add_nu_gradient_hooks(model):
    """The CBN floor of a whole model: every ``Conv2d`` with a BatchNorm2d norm also computes
    dnu/dW at each training forward (result discarded)."""

    def stash(conv, args):
        conv.__dict__["_bench_input"] = args[0].detach()

    def nu_gradient(conv):
        def hook(bn, args, out):
            x = conv.__dict__.pop("_bench_input", None)
            if bn.training and x is not None:
                with torch.no_grad():
                    conv_nu_weight_gradient(conv, x, args[0].detach())

        return hook

    n = 0
    for conv in model.modules():
        norm = getattr(conv, "norm", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
            conv.register_forward_pre_hook(stash)
            norm.register_forward_hook(nu_gradient(conv))
            n += 1
    if not n:
        raise RuntimeError("no Conv2d with a BatchNorm2d norm found for the CBN floor")
    return model


def mabn_steady(m):
    """Put a MABN layer (d2norm's or the official-style reference) in its steady state: past
    warm-up and the renorm threshold, ring buffers filled, so moving averages and the renorm
    clamp are active."""
    steady = max(1000, m.warmup_iters) + m.buffer_size + 1
    m.iters.fill_(steady)
    m.buffer_x2.fill_(1.0)
    m.buffer_gz.fill_(0.01)
    return m


# ----------------------------------------------------------------------------- report
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
    block = f"{begin}\n{body.strip()}\n\n<!-- DATA {name} {json.dumps(data)} -->\n{end}"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else HEADER
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pat.search(text):
        text = pat.sub(lambda _: block, text)
    else:
        order = ["layers", "kernels", "model"]  # keep the sections in this order
        later = [n for n in order[order.index(name) + 1 :]] if name in order else []
        pos = min(
            (text.find(f"<!-- BEGIN {n} -->") for n in later if f"<!-- BEGIN {n} -->" in text), default=-1
        )
        if pos >= 0:
            text = text[:pos] + block + "\n\n" + text[pos:]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
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
    """Bar chart of the time ratios of every section found in ``md_path`` (bars in the order the
    variants were measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = read_sections(md_path)
    text = open(md_path, encoding="utf-8").read()
    panels = []
    lay = data.get("layers")
    if lay:
        for gname in ("norm", "pair"):  # variants in the order they were measured
            shapes = sorted(lay.get(gname, {}).items(), key=lambda kv: text.find(kv[0]))
            for shape, res in shapes:
                panels.append(
                    (
                        f"{'norm alone' if gname == 'norm' else 'conv + norm'}: {shape}",
                        [(v, r["time_ratio"], r.get("peak_ratio")) for v, r in res.items()],
                        "fwd+bwd time / reference",
                    )
                )
    mod = data.get("model")
    if mod:
        rows = mod.get("train", {}).items()
        panels.append(
            (
                f"Mask R-CNN R-50-FPN training iteration ({mod.get('size', '')})",
                [(v, r["time_ratio"], r.get("peak_ratio")) for v, r in rows],
                "iteration time / BN*",
            )
        )
        inf = mod.get("inference", {}).items()
        if inf:
            panels.append(
                (
                    "inference per image (before / after folding)",
                    [(v, r["ratio"], None) for v, r in inf],
                    "time / BN* unfolded",
                )
            )
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
            ax.bar(
                [x + w / 2 for x in xs],
                [p if p is not None else 0 for p in pk],
                width=w,
                label="peak memory",
                color="tab:orange",
            )
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_ylabel(ylabel.replace("time", "ratio"), fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        if has_peak:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
