#!/usr/bin/env python
"""The small-batch study: every norm trained at per-device batch 1, 2, 4, 8 on the same work.

    python tools/small_batch_study.py                      # full study (see docs/small_batch_study.md)
    python tools/small_batch_study.py --quick              # a bounded subset
    python tools/small_batch_study.py --resume             # continue an interrupted study
    python tools/small_batch_study.py --table-only         # rewrite table/plot from the results

Each run trains the synthetic Mask R-CNN R-18-FPN of ``configs/synthetic/study/`` (96 px images,
the 200-image split ``d2norm_shapes_study_train``) in this process with d2norm's ``Trainer``, for
the same number of iterations at every batch size, then evaluates box / mask AP on the 100-image
split ``d2norm_shapes_study_val``. Rules that depend on the batch size b (stated in the output):

* linear learning-rate scaling: ``BASE_LR = base_lr * b / 4`` (base_lr = the config's 0.02 at
  its reference batch 4); warm-up ``WARMUP_ITERS = 10%`` and LR steps at 75% / 90% of the
  iterations, the same at every b;
* MABN simulates a batch of 16 images: ``D2NORM.MABN.BUFFER_SIZE = max(1, 16 // b)``; its
  warm-up and CBN's burn-in equal the LR warm-up.

SyncBN is left out by default: in one process it is BN exactly (same statistics, same code
path), so its curve would duplicate BN's; ``--norms SyncBN`` runs it anyway.

Each finished run is appended to ``<output>/results.jsonl`` (one JSON object per line, a single
``O_APPEND`` write followed by fsync), so an interrupted study restarted with ``--resume`` skips
the runs already recorded with the same settings. The table (``--table``, Markdown) and the plot
(``--plot``, PNG: AP vs batch size, one line per norm, mean +- sample std over seeds) are
rewritten after every run. Training logs go to ``<output>/study.log``.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUDY_CONFIG_DIR = os.path.join(ROOT, "configs", "synthetic", "study")
ALL_NORMS = ("BN", "SyncBN", "GN", "GN+WS", "CBN", "MABN")
DEFAULT_NORMS = ("BN", "GN", "GN+WS", "CBN", "MABN")
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
DEFAULT_SEEDS = (0, 1)
DEFAULT_ITERS = 300
REFERENCE_BATCH = 4  # the batch the config's BASE_LR is meant for
MABN_SIMULATED_BATCH = 16
# --quick: every norm at batch 1 and 4, one seed, 30 iterations, a 50-image val split
QUICK = dict(norms=DEFAULT_NORMS, batch_sizes=(1, 4), seeds=(0,), iters=30,
             opts=("DATASETS.TEST", "('d2norm_shapes_study_quick_val',)"))
RECORD_VERSION = 1


# ----------------------------------------------------------------------------- records
def run_key(rec):
    return (rec["norm"], int(rec["batch"]), int(rec["seed"]), int(rec["iters"]), rec["settings_id"])


def append_record(path, rec):
    """Append one record as a JSON line with a single O_APPEND write, then fsync.

    If an earlier writer died mid-line (the file does not end with a newline), the new record
    starts on a fresh line so that only the torn line is lost."""
    line = json.dumps(rec, sort_keys=True, allow_nan=False) + "\n"
    prefix = ""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                prefix = "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (prefix + line).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_records(path):
    """All well-formed records of a JSONL file (torn or foreign lines are skipped, counted)."""
    records, bad = [], 0
    if not os.path.exists(path):
        return records, bad
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                run_key(rec)
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            records.append(rec)
    return records, bad


def pending_runs(planned, records):
    """The planned runs (dicts with norm/batch/seed/iters/settings_id) not yet in ``records``."""
    done = {run_key(r) for r in records}
    return [p for p in planned if run_key(p) not in done]


# ----------------------------------------------------------------------------- aggregation
def aggregate(records, metric):
    """{(norm, batch): (mean, sample std or None, n)} of ``metric`` over the records' seeds.

    Records with ``status != "ok"`` are left out of the statistics. If a (norm, batch, seed)
    appears more than once, the last record wins."""
    last = {}
    for r in records:
        last[(r["norm"], int(r["batch"]), int(r["seed"]))] = r
    groups = {}
    for (norm, batch, _), r in sorted(last.items()):
        if r.get("status", "ok") != "ok" or r.get(metric) is None:
            continue
        groups.setdefault((norm, batch), []).append(float(r[metric]))
    out = {}
    for key, vals in groups.items():
        std = statistics.stdev(vals) if len(vals) > 1 else None
        out[key] = (statistics.fmean(vals), std, len(vals))
    return out


def _fmt(cell):
    if cell is None:
        return "–"
    mean, std, n = cell
    if std is None:
        return f"{mean:.1f} (n={n})"
    return f"{mean:.1f} ± {std:.1f} (n={n})"


def _norm_order(norms):
    return sorted(norms, key=lambda n: ALL_NORMS.index(n) if n in ALL_NORMS else len(ALL_NORMS))


def metric_table(records, metric):
    """A Markdown table: one row per norm, one column per batch size, ``mean ± std (n=seeds)``."""
    agg = aggregate(records, metric)
    norms = _norm_order({k[0] for k in agg} | {r["norm"] for r in records})
    batches = sorted({k[1] for k in agg} | {int(r["batch"]) for r in records})
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for norm in norms:
        cells = []
        for b in batches:
            cell = _fmt(agg.get((norm, b)))
            failed = sum(1 for r in records if r["norm"] == norm and int(r["batch"]) == b
                         and r.get("status", "ok") != "ok")
            if failed:
                cell += f" ({failed} failed)"
            cells.append(cell)
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drop_summary(records, metric):
    """Per norm: AP at the largest batch minus AP at each smaller batch, vs the seed spread."""
    agg = aggregate(records, metric)
    lines = []
    for norm in _norm_order({k[0] for k in agg}):
        batches = sorted(b for (n, b) in agg if n == norm)
        if len(batches) < 2:
            continue
        ref_b = batches[-1]
        ref_mean, ref_std, _ = agg[(norm, ref_b)]
        parts = []
        for b in batches[:-1]:
            mean, std, _ = agg[(norm, b)]
            drop = ref_mean - mean
            if std is None or ref_std is None:
                verdict = "1 seed, no spread"
            else:
                noise = math.sqrt(std ** 2 + ref_std ** 2)
                verdict = (f"{drop / noise:.1f}x the combined std {noise:.1f}" if noise > 0
                           else "no spread")
            parts.append(f"batch {b}: {drop:+.1f} ({verdict})")
        lines.append(f"* {norm}: AP(batch {ref_b}) − AP(batch b) = " + "; ".join(parts))
    return "\n".join(lines)


def runtime_table(records):
    last = {}
    for r in records:
        last[(r["norm"], int(r["batch"]), int(r["seed"]))] = r
    by = {}
    for (norm, b, _), r in last.items():
        if "train_s" in r:
            by.setdefault((norm, b), []).append(r["train_s"] / max(1, r["iters"]))
    if not by:
        return ""
    norms = _norm_order({k[0] for k in by})
    batches = sorted({k[1] for k in by})
    lines = ["| norm | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for n in norms:
        cells = [f"{statistics.median(by[(n, b)]):.2f}" if (n, b) in by else "–" for b in batches]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path, records, meta):
    """Write the study's Markdown report for ``records`` (a list of run records)."""
    title = "# Small-batch study" + (" (quick mode)" if meta.get("quick") else "")
    parts = [title, ""]
    if meta.get("quick"):
        parts += ["**This is the `--quick` result** (a bounded subset of the study, run on a shared "
                  "machine); the full study's command and expected time are below.", ""]
    parts += [meta.get("intro", "").strip(), ""] if meta.get("intro") else []
    if meta.get("settings"):
        parts += ["## Settings", "", meta["settings"].strip(), ""]
    parts += ["## Box AP (synthetic val, mean ± sample std over seeds)", "",
              metric_table(records, "box_ap"), "",
              "## Mask AP (synthetic val, mean ± sample std over seeds)", "",
              metric_table(records, "mask_ap"), ""]
    summ_box, summ_mask = drop_summary(records, "box_ap"), drop_summary(records, "mask_ap")
    if summ_box or summ_mask:
        parts += ["## Drop from the largest batch (computed)", "",
                  "Box AP:", "", summ_box or "(needs two batch sizes)", "",
                  "Mask AP:", "", summ_mask or "(needs two batch sizes)", ""]
    rt = runtime_table(records)
    if rt:
        built_in = any("build_s" not in r for r in records if "train_s" in r)
        parts += ["## Training time per iteration (s, median over seeds)", "",
                  ("Includes building the model; evaluation excluded." if built_in else
                   "Model building and evaluation excluded.")
                  + " Indicative only: the machine was shared and its load changed between runs.",
                  "", rt, ""]
    if meta.get("findings"):
        parts += ["## Findings", "", meta["findings"].strip(), ""]
    if meta.get("footer"):
        parts += [meta["footer"].strip(), ""]
    _atomic_write_text(path, "\n".join(parts))


def write_plot(path, records, title="Small-batch study"):
    """AP vs batch size (log2 axis), one line per norm, error bars = sample std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric, label in zip(axes, ("box_ap", "mask_ap"), ("box AP", "mask AP")):
        agg = aggregate(records, metric)
        norms = _norm_order({k[0] for k in agg})
        for i, norm in enumerate(norms):
            pts = sorted((b, v) for (n, b), v in agg.items() if n == norm)
            if not pts:
                continue
            shift = 2 ** ((i - (len(norms) - 1) / 2) * 0.03)  # small offset so bars don't overlap
            xs = [b * shift for b, _ in pts]
            ys = [v[0] for _, v in pts]
            es = [v[1] or 0.0 for _, v in pts]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=norm)
        ax.set_xscale("log", base=2)
        batches = sorted({int(r["batch"]) for r in records})
        ax.set_xticks(batches)
        ax.set_xticklabels([str(b) for b in batches])
        ax.minorticks_off()
        if batches:
            ax.set_xlim(min(batches) / 1.5, max(batches) * 1.5)
        ax.set_xlabel("images per device (batch)")
        ax.set_ylabel(f"{label} (synthetic val)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- one run
def config_file_for(norm):
    return os.path.join(STUDY_CONFIG_DIR, f"mask_rcnn_R_18_FPN_{norm.replace('+', '_')}.yaml")


def schedule(iters):
    """(STEPS, WARMUP_ITERS) for a run of ``iters`` iterations (the same at every batch size)."""
    steps = tuple(sorted({s for s in (int(iters * 0.75), int(iters * 0.9)) if 0 < s < iters}))
    while steps and len(steps) + 1 >= iters:  # (only for a few-iteration smoke run)
        steps = steps[:-1]
    return steps, max(1, round(iters * 0.1))


def build_cfg(norm, batch, seed, iters, output_dir, data_root="", opts=()):
    from detectron2.config import get_cfg

    from d2norm import add_d2norm_config

    cfg = get_cfg()
    add_d2norm_config(cfg)
    cfg.merge_from_file(config_file_for(norm))
    cfg.merge_from_list(list(opts))
    base_lr = cfg.SOLVER.BASE_LR
    steps, warmup = schedule(iters)
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.BASE_LR = base_lr * batch / REFERENCE_BATCH
    cfg.SOLVER.MAX_ITER = iters
    cfg.SOLVER.STEPS = steps
    cfg.SOLVER.WARMUP_ITERS = warmup
    cfg.D2NORM.CBN.BURNIN_ITERS = warmup
    cfg.D2NORM.MABN.WARMUP_ITERS = warmup
    cfg.D2NORM.MABN.BUFFER_SIZE = max(1, MABN_SIMULATED_BATCH // batch)
    cfg.SEED = seed
    cfg.OUTPUT_DIR = output_dir
    if data_root:
        cfg.D2NORM.DATA.ROOT = data_root
    cfg.freeze()
    return cfg


def _study_trainer_class():
    from detectron2.engine import HookBase, hooks

    from d2norm.engine import Trainer

    class _Progress(HookBase):
        def __init__(self, callback, batch):
            self._callback, self._batch = callback, batch

        def after_step(self):
            if self._callback is not None:
                self._callback(self._batch)

    class StudyTrainer(Trainer):
        """d2norm's Trainer without checkpoint files or the end-of-training eval hook (the study
        evaluates once, timed separately), plus a progress callback per iteration."""

        progress_callback = None

        def build_hooks(self):
            ret = [h for h in super().build_hooks()
                   if not isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))]
            ret.append(_Progress(self.progress_callback, self.cfg.SOLVER.IMS_PER_BATCH))
            return ret

    return StudyTrainer


def _finite_or_zero(v):
    """COCO AP from detectron2 (NaN when the model made no detection at all: AP 0)."""
    v = float(v)
    return (0.0, True) if math.isnan(v) else (v, False)


def train_and_evaluate(spec, output_root, data_root="", opts=(), progress=None, keep_outputs=False):
    """Train and evaluate one run (``spec``: norm, batch, seed, iters, settings_id) in this process;
    returns its record."""
    import torch
    from detectron2.utils.env import seed_all_rng

    from d2norm.data import register_datasets

    norm, batch, seed, iters = spec["norm"], spec["batch"], spec["seed"], spec["iters"]
    run_dir = os.path.join(output_root, "runs", f"{norm.replace('+', '_')}_b{batch}_s{seed}_i{iters}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a run interrupted before its record
    os.makedirs(run_dir)
    cfg = build_cfg(norm, batch, seed, iters, run_dir, data_root, opts)
    register_datasets(cfg)
    Trainer = _study_trainer_class()
    Trainer.progress_callback = staticmethod(progress) if progress else None
    rec = dict(spec, version=RECORD_VERSION, lr=cfg.SOLVER.BASE_LR,
               mabn_buffer=cfg.D2NORM.MABN.BUFFER_SIZE, status="ok")
    seed_all_rng(seed)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        rec["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.train()
    except FloatingPointError as e:  # the non-finite guard gave up: the run diverged
        rec.update(status="diverged", error=str(e)[:300], box_ap=None, mask_ap=None,
                   train_s=time.perf_counter() - t0)
        if not keep_outputs:
            shutil.rmtree(run_dir, ignore_errors=True)
        return rec
    rec["train_s"] = time.perf_counter() - t0
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    tail = losses[-max(1, len(losses) // 10):]
    rec["final_loss"] = float(statistics.median(tail)) if tail else None
    guard = getattr(trainer, "_nonfinite_guard", None)
    rec["skipped_steps"] = int(guard.skipped) if guard is not None else 0
    t0 = time.perf_counter()
    model = trainer.model
    res = Trainer.test(cfg, model)
    rec["eval_s"] = time.perf_counter() - t0
    for task, prefix in (("bbox", "box"), ("segm", "mask")):
        r = res.get(task, {})
        for k in ("AP", "AP50", "AP75"):
            if k in r:
                v, empty = _finite_or_zero(r[k])
                rec[f"{prefix}_{k.lower()}"] = v
                if empty:
                    rec["no_detections"] = True
    del trainer, model
    if not keep_outputs:
        shutil.rmtree(run_dir, ignore_errors=True)
    torch.set_grad_enabled(True)
    return rec


# ----------------------------------------------------------------------------- the study
def settings_id(args):
    """Identifies everything but (norm, batch, seed, iters) that changes a run's result."""
    files = {}
    for name in sorted(os.listdir(STUDY_CONFIG_DIR)):
        if name.endswith(".yaml"):
            with open(os.path.join(STUDY_CONFIG_DIR, name), encoding="utf-8") as f:
                files[name] = f.read()
    blob = json.dumps({"configs": files, "opts": list(args.opts), "ref_batch": REFERENCE_BATCH,
                       "mabn_sim": MABN_SIMULATED_BATCH, "version": RECORD_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def plan(args):
    sid = settings_id(args)
    return [dict(norm=n, batch=b, seed=s, iters=args.iters, settings_id=sid)
            for s in args.seeds for n in args.norms for b in args.batch_sizes]


class _LinePrinter:
    """Fallback progress printer (one line, rewritten) when tqdm is not installed."""

    def __init__(self, total, desc):
        self.total, self.n, self.desc, self.t0, self.post = total, 0, desc, time.time(), ""

    def update(self, k):
        self.n += k
        el = time.time() - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else float("nan")
        sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total} img, {el:.0f}s elapsed, "
                         f"ETA {eta:.0f}s {self.post}   ")
        sys.stderr.flush()

    def set_postfix_str(self, s):
        self.post = s

    def write(self, s):
        sys.stderr.write("\r" + s + "\n")

    def close(self):
        sys.stderr.write("\n")


def _progress_bar(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return _LinePrinter(total, desc)
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, smoothing=0.05)


@contextlib.contextmanager
def _logs_to_file(output):
    """detectron2 / d2norm logs go to <output>/study.log (not the terminal) inside the block;
    the loggers' previous settings are restored afterwards."""
    handler = logging.FileHandler(os.path.join(output, "study.log"))
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
    saved = []
    for name in ("detectron2", "d2norm", "fvcore", "d2.checkpoint"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, list(lg.handlers), lg.propagate))
        lg.setLevel(logging.INFO)
        lg.handlers[:] = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        for lg, level, handlers, propagate in saved:
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()


def _machine():
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
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def _settings_text(args):
    steps, warmup = schedule(args.iters)
    return "\n".join([
        "* Model: Mask R-CNN R-18-FPN of `configs/synthetic/study/` (from scratch, nothing frozen; "
        "the norm in backbone, FPN, 4conv1fc box head and mask head), CPU, fp32.",
        "* Data: train `d2norm_shapes_study_train` (200 images, 96×96), evaluate "
        + ("`d2norm_shapes_study_quick_val` (50 images, 96×96; `--quick`)" if args.quick else
           "`d2norm_shapes_study_val` (100 images, 96×96)")
        + ", COCO box / mask AP (pycocotools); a model without any detection scores AP 0.",
        f"* Schedule: {args.iters} iterations at every batch size (so batch 8 sees 8× the images "
        f"of batch 1); LR ×0.1 at iterations {' and '.join(map(str, steps)) or '(none)'}, "
        f"linear warm-up {warmup} iterations.",
        f"* LR rule: linear scaling, lr = 0.02 × b / {REFERENCE_BATCH} (b = images per device; "
        "one device).",
        f"* CBN: window 3, burn-in {warmup} iterations. MABN: buffer = max(1, "
        f"{MABN_SIMULATED_BATCH} // b) (simulated batch {MABN_SIMULATED_BATCH}), warm-up {warmup}.",
        "* SyncBN is not a separate line: in one process it is BN exactly.",
        f"* Norms: {', '.join(args.norms)}; batch sizes: {', '.join(map(str, args.batch_sizes))}; "
        f"seeds: {', '.join(map(str, args.seeds))} (seed = weight init and data order).",
        f"* Extra config options: `{' '.join(args.user_opts)}`" if args.user_opts else "",
    ]).strip()


def _display_argv(argv):
    """The study's command line without the flags that only concern this invocation."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--table-only", "--no-progress", "--keep-outputs"):
            continue
        if a in ("--findings", "--load-note"):
            skip = True
            continue
        if a.startswith("--findings=") or a.startswith("--load-note="):
            continue
        out.append(a)
    return out


def report(args, records, wall_s=None):
    cmd = "python tools/small_batch_study.py " + " ".join(shlex.quote(a) for a in _display_argv(args.argv))
    run_s = sum(r.get("train_s", 0.0) + r.get("eval_s", 0.0) for r in records)
    loads = [r["load_start"] for r in records if r.get("load_start") is not None]
    dates = sorted(r["finished"][:10] for r in records if r.get("finished"))
    footer = [
        "## Reproduce",
        "",
        "This result:",
        "",
        f"```bash\n{cmd.strip()}\n```",
        "",
        f"Machine: {_machine()}; "
        + (f"date {dates[-1]}" if dates else f"date {datetime.date.today().isoformat()}")
        + f"; {len(records)} runs, {run_s / 60:.1f} min of training + evaluation"
        + (f" (wall time of the last invocation {wall_s / 60:.1f} min)" if wall_s else "")
        + (f"; shared machine, 1-min load average {min(loads):.1f}–{max(loads):.1f} at the runs' "
           "starts (2 cores)" if loads else "")
        + (f"; {args.load_note}" if args.load_note else "") + ".",
        "",
        "Full study (5 norms × batch 1, 2, 4, 8 × 2 seeds × 300 iterations = 40 runs):",
        "",
        "```bash\nnice -n 15 python tools/small_batch_study.py --output output/small_batch_study \\\n"
        "    --table docs/small_batch_study.md --plot docs/small_batch_study.png\n```",
        "",
        FULL_STUDY_TIME_NOTE,
        "",
        "Quick mode (`--quick`: 10 runs of 30 iterations, 50 val images): ~6 min on the 2 cores "
        "when they are mostly free, up to ~25 min when other jobs hold them.",
        "",
        "Raw per-run records: `<output>/results.jsonl`; an interrupted study continues with `--resume`.",
    ]
    meta = dict(quick=args.quick, settings=_settings_text(args), footer="\n".join(footer),
                findings=_read_findings(args.findings))
    write_markdown(args.table, records, meta)
    write_plot(args.plot, records,
               title="Small-batch study" + (" (--quick)" if args.quick else "")
               + f": {args.iters} iterations, mean ± std over seeds")


FULL_STUDY_TIME_NOTE = (
    "Expected wall time of the full study on 2 idle CPU cores (AMD EPYC, 2 torch threads): about "
    "1¼ h. Measured on an idle moment: one iteration costs about 0.12 s + 0.045 s per image (BN, "
    "GN, MABN; CBN and GN+WS about 1.3× that), so one norm and seed, 300 iterations at batch 1, "
    "2, 4 and 8, takes ~6 min, ×10 for 5 norms × 2 seeds, plus ~10 s of evaluation per run. On a "
    "machine shared with other jobs expect 2–5× longer (this tool runs at the priority it is "
    "given; use `nice`)."
)


def _read_findings(path):
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help=f"a bounded subset: norms {', '.join(QUICK['norms'])}, batch sizes "
                        f"{QUICK['batch_sizes']}, seeds {QUICK['seeds']}, {QUICK['iters']} iterations, "
                        "evaluation on the 50-image split d2norm_shapes_study_quick_val (explicit "
                        "--norms/--batch-sizes/--seeds/--iters still win); ~6 min on 2 free cores")
    p.add_argument("--norms", nargs="+", choices=ALL_NORMS, default=None,
                   help=f"default: {' '.join(DEFAULT_NORMS)}")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None,
                   help=f"images per device; default: {' '.join(map(str, DEFAULT_BATCH_SIZES))}")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"default: {' '.join(map(str, DEFAULT_SEEDS))}")
    p.add_argument("--iters", type=int, default=None, help=f"iterations per run (default {DEFAULT_ITERS})")
    p.add_argument("--output", default=os.path.join("output", "small_batch_study"),
                   help="folder for results.jsonl, study.log and the per-run folders")
    p.add_argument("--table", default=None, help="Markdown report (default <output>/small_batch_study.md)")
    p.add_argument("--plot", default=None, help="PNG plot (default <output>/small_batch_study.png)")
    p.add_argument("--resume", action="store_true",
                   help="skip the runs already in <output>/results.jsonl (same settings)")
    p.add_argument("--table-only", action="store_true",
                   help="only rewrite the table / plot from <output>/results.jsonl")
    p.add_argument("--data-root", default="", help="synthetic dataset folder (default: D2NORM.DATA.ROOT)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--findings", default=None, help="a Markdown file whose text goes under 'Findings'")
    p.add_argument("--load-note", default="", help="a note on the machine's load, for the report")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's folder (logs, predictions)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("opts", nargs=argparse.REMAINDER,
                   help="config overrides for every run, KEY VALUE pairs after all flags (e.g. "
                        "SOLVER.BASE_LR 0.01: the base of the linear rule). The batch size, the "
                        "scaled LR, the schedule (STEPS, WARMUP_ITERS), the CBN burn-in and the "
                        "MABN buffer / warm-up are then set by this tool")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    q = QUICK if args.quick else {}
    args.norms = args.norms or list(q.get("norms", DEFAULT_NORMS))
    args.batch_sizes = args.batch_sizes or list(q.get("batch_sizes", DEFAULT_BATCH_SIZES))
    args.seeds = args.seeds if args.seeds is not None else list(q.get("seeds", DEFAULT_SEEDS))
    args.iters = args.iters or q.get("iters", DEFAULT_ITERS)
    if any(b < 1 for b in args.batch_sizes) or args.iters < 1:
        p.error("--batch-sizes and --iters must be >= 1")
    if args.opts and args.opts[0] == "--":
        args.opts = args.opts[1:]
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    args.user_opts = list(args.opts)
    args.opts = list(q.get("opts", ())) + list(args.opts)  # the user's overrides win
    args.table = args.table or os.path.join(args.output, "small_batch_study.md")
    args.plot = args.plot or os.path.join(args.output, "small_batch_study.png")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    results = os.path.join(args.output, "results.jsonl")
    records, bad = load_records(results)
    if bad:
        print(f"note: skipped {bad} unreadable line(s) of {results} (an interrupted write)")
    planned = plan(args)
    keys = {run_key(p) for p in planned}
    if args.table_only:
        mine = [r for r in records if run_key(r) in keys]
        report(args, mine)
        print(f"wrote {args.table} and {args.plot} from {len(mine)} record(s)")
        return mine
    if records and not args.resume:
        sys.exit(f"{results} already holds {len(records)} record(s). Fix: pass --resume to continue "
                 "that study, --table-only to redraw it, or choose another --output.")
    todo = pending_runs(planned, records)
    stale = [r for r in records if run_key(r) not in keys]
    if stale:
        print(f"note: {len(stale)} record(s) in {results} have other settings (norms / batch sizes / "
              "seeds / iterations / config) and are left out of this report")
    print(f"{len(planned)} runs planned, {len(planned) - len(todo)} already done, {len(todo)} to go "
          f"({', '.join(args.norms)} × batch {args.batch_sizes} × seeds {args.seeds} × {args.iters} it)")

    import torch

    import d2norm  # noqa: F401  (the _C stand-in and the norm names)

    if args.threads:
        torch.set_num_threads(args.threads)
    total = sum(p["iters"] * p["batch"] for p in todo)
    bar = None if args.no_progress else _progress_bar(total, "study")
    t_start = time.time()
    log_file = open(os.path.join(args.output, "study.log"), "a")
    try:
        for i, spec in enumerate(todo):
            if bar is not None:
                bar.set_postfix_str(f"run {i + 1}/{len(todo)}: {spec['norm']} b{spec['batch']} "
                                    f"s{spec['seed']}")
            try:
                load = round(os.getloadavg()[0], 2)
            except OSError:
                load = None
            with _logs_to_file(args.output), contextlib.redirect_stdout(log_file):
                # (pycocotools prints its summaries)
                rec = train_and_evaluate(spec, args.output, args.data_root, args.opts,
                                         progress=bar.update if bar is not None else None,
                                         keep_outputs=args.keep_outputs)
            rec["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            rec["load_start"] = load
            append_record(results, rec)
            records.append(rec)
            msg = (f"{spec['norm']:>6} b{spec['batch']} s{spec['seed']}: box AP {rec.get('box_ap')}, "
                   f"mask AP {rec.get('mask_ap')} ({rec['status']}, train {rec['train_s']:.0f}s)")
            if bar is not None:
                bar.write(msg)
            else:
                print(msg)
            report(args, [r for r in records if run_key(r) in keys], time.time() - t_start)
    finally:
        log_file.close()
        if bar is not None:
            bar.close()
    mine = [r for r in records if run_key(r) in keys]
    report(args, mine, time.time() - t_start)
    print(f"wrote {results}, {args.table}, {args.plot} ({(time.time() - t_start) / 60:.1f} min)")
    return mine


if __name__ == "__main__":
    main()
