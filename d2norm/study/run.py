"""Running the study: one run in P gloo processes, and many runs side by side (``jobs``).

One run (:func:`execute_run`, in its own process):

1. ``d2norm.engine.launch.launch_cpu`` starts P processes (one gloo group, ``--num-gpus P``
   semantics); each trains the same model with ``total_batch / P`` images per iteration through
   d2norm's ``Trainer`` (DDP averages the gradients, so the optimizer sees the gradient of all
   ``total_batch`` images). Rank 0 saves the model at the evaluation points of the schedule
   (as detectron2 does, the saved model holds rank 0's norm statistics), and every rank records
   which images it trained on.
2. The run's process evaluates each saved model alone (box AP, COCO), so evaluation is the same
   code at every P.

Many runs (:func:`run_grid`): runs start while their processes fit in ``jobs`` slots (a run
with P processes takes min(P, jobs) slots), each process with ``threads`` torch threads.
Each finished run is appended to the JSONL file; a progress bar shows iterations and the ETA.
"""

import datetime
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import sys
import time
from datetime import timedelta

from ..data import register_datasets
from .records import append_record, load_records, pending_runs, run_key
from .settings import StudySettings

__all__ = ["execute_run", "run_grid", "run_or_report", "run_from_args", "run_dir_name"]

PROGRESS_EVERY = 5  # iterations between progress-file writes


def run_dir_name(spec):
    return f"{spec['norm'].replace('+', '_')}_P{spec['procs']}_s{spec['seed']}_i{spec['iters']}"


def _eval_iters(s, seed):
    fr = (1.0,) + (s.curve_fracs if seed in s.curve_seeds else ())
    its = {max(1, int(round(s.iters * f))) for f in fr if 0 < f <= 1}
    return sorted(its | set(s.tail_iters()))


def _study_trainer(snapshot_iters, run_dir):
    from torch.nn.parallel import DistributedDataParallel

    from d2norm.engine import Trainer

    from detectron2.engine import HookBase, hooks
    from detectron2.utils import comm

    class Snapshots(HookBase):
        """Rank 0 saves the model at ``snapshot_iters`` and writes the iteration for the progress
        bar; every rank records the image ids of each of its batches."""

        def __init__(self):
            self.image_ids = []

        def before_train(self):
            model = self.trainer.model
            self.module = model.module if isinstance(model, DistributedDataParallel) else model
            self.module.register_forward_pre_hook(self._record_batch)

        def _record_batch(self, module, args):
            if module.training and args and isinstance(args[0], (list, tuple)):
                self.image_ids.append([int(d["image_id"]) for d in args[0]])

        def after_step(self):
            it = self.trainer.iter + 1
            if not comm.is_main_process():
                return
            if it in snapshot_iters:
                import torch

                tmp = os.path.join(run_dir, f".model_{it:06d}.pth")
                torch.save(self.module.state_dict(), tmp)
                os.replace(tmp, os.path.join(run_dir, f"model_{it:06d}.pth"))
            if it % PROGRESS_EVERY == 0 or it == self.trainer.max_iter:
                with open(os.path.join(run_dir, "progress"), "w") as f:
                    f.write(str(it))

    class StudyTrainer(Trainer):
        """d2norm's Trainer without checkpoint files or evaluation hooks, plus :class:`Snapshots`."""

        def build_hooks(self):
            ret = [
                h
                for h in super().build_hooks()
                if not isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
            ]
            self.snapshots = Snapshots()
            return ret + [self.snapshots]

    return StudyTrainer


def _setup_logging(run_dir, rank):
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "d2norm"):
        setup_logger(
            os.path.join(run_dir, f"log_rank{rank}.txt"),
            distributed_rank=rank,
            name=name,
            abbrev_name="d2" if name == "detectron2" else name,
        )


def _rank_main(s, spec, run_dir):
    """Training in one of the run's P processes (or in the run's process when P = 1)."""
    import torch

    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    torch.set_num_threads(s.threads)
    rank = comm.get_rank()
    _setup_logging(run_dir, rank)
    cfg = s.build_cfg(spec["norm"], spec["procs"], spec["seed"], run_dir)
    register_datasets(cfg)
    seed_all_rng(spec["seed"])
    trainer = _study_trainer(set(_eval_iters(s, spec["seed"])), run_dir)(cfg)
    trainer.resume_or_load(resume=False)
    info = {"status": "ok"}
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        trainer.train()
    except FloatingPointError as e:  # the non-finite guard gave up: the run diverged
        info.update(status="diverged", error=str(e)[:300])
    info["train_s"] = time.perf_counter() - t0
    cpu = comm.all_gather((time.process_time() - cpu0, time.process_time()))
    info["train_cpu_s"] = sum(c[0] for c in cpu)  # training loop, all processes
    info["rank_cpu_s"] = sum(c[1] for c in cpu)  # whole processes (start-up and build included)
    batches = comm.all_gather(trainer.snapshots.image_ids)
    if comm.is_main_process():
        losses = [v for v, _ in trainer.storage.history("total_loss").values()]
        tail = losses[-max(1, len(losses) // 10) :]
        info["final_loss"] = float(statistics.median(tail)) if tail else None
        guard = getattr(trainer, "_nonfinite_guard", None)
        info["skipped_steps"] = int(getattr(guard, "skipped", 0)) if guard is not None else 0
        per_iter = [sorted(i for b in step for i in b) for step in zip(*batches)]
        info["images_per_iter"] = sorted({len(x) for x in per_iter})
        info["images_per_proc"] = sorted({len(b) for rank_ids in batches for b in rank_ids})
        info["images_digest"] = hashlib.sha1(json.dumps(per_iter).encode()).hexdigest()[:16]
        with open(os.path.join(run_dir, "train.json"), "w") as f:
            json.dump(info, f)


def _box_ap(res, prefix="box"):
    import math

    out = {}
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        v = res.get("bbox", {}).get(k)
        if v is not None:
            v = float(v)
            out[f"{prefix}_{k.lower()}"] = 0.0 if math.isnan(v) else v  # NaN: no detection at all
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _evaluate(s, spec, cfg, run_dir):
    """Box AP of every saved model; for models with running-statistics norms also with statistics
    re-estimated over ``s.precise_images`` training images (``precise_`` keys); the val loss and
    the val predictions of the final model in both modes (``d2norm.study.evaluation``)."""
    import torch

    from d2norm.engine import Trainer

    from .evaluation import (
        fixed_batches,
        reestimate_statistics,
        running_statistics_norms,
        save_predictions,
        validation_loss,
    )

    model = Trainer.build_model(cfg)
    precise = bool(running_statistics_norms(model))
    train_batches = []
    if precise:
        train_batches = fixed_batches(cfg, cfg.DATASETS.TRAIN[0], s.precise_images, s.total_batch)
    val_batches = fixed_batches(cfg, cfg.DATASETS.TEST[0], 0, s.total_batch)
    pred_dir = os.path.join(os.path.dirname(os.path.dirname(run_dir)), "predictions")
    results_json = os.path.join(
        cfg.OUTPUT_DIR, "inference", cfg.DATASETS.TEST[0], "coco_instances_results.json"
    )
    out, curve = {}, {}
    for it in _eval_iters(s, spec["seed"]):
        path = os.path.join(run_dir, f"model_{it:06d}.pth")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        final = it == s.iters
        curve[str(it)] = _box_ap(Trainer.test(cfg, model))
        if final:
            out["val_loss"] = validation_loss(model, val_batches)["total_loss"]
            save_predictions(results_json, os.path.join(pred_dir, run_dir_name(spec) + ".json.gz"))
        if precise:
            reestimate_statistics(model, train_batches)
            curve[str(it)].update(_box_ap(Trainer.test(cfg, model), "precise_box"))
            if final:
                out["precise_val_loss"] = validation_loss(model, val_batches)["total_loss"]
                save_predictions(
                    results_json, os.path.join(pred_dir, run_dir_name(spec) + "_precise.json.gz")
                )
    out.update(curve[str(s.iters)])
    out["curve"] = curve
    tail = [str(i) for i in s.tail_iters()]
    for key in ("box_ap", "precise_box_ap"):
        if all(key in curve[i] for i in tail):
            out[f"{key}_last{len(tail)}"] = _mean(curve[i][key] for i in tail)
    out["tail_iters"] = list(s.tail_iters())
    out["precise_images"] = s.precise_images if precise else None
    return out


def execute_run(s, spec, run_dir):
    """Train and evaluate one run; returns its record (a dict). Runs in the calling process,
    which becomes the parent of the run's P training processes."""
    import torch

    import d2norm  # noqa: F401  (the _C stand-in and the norm names)
    from d2norm.engine.launch import launch_cpu

    torch.set_num_threads(s.threads)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    t0 = time.perf_counter()
    launch_cpu(_rank_main, spec["procs"], args=(s, spec, run_dir), timeout=timedelta(minutes=15))
    with open(os.path.join(run_dir, "train.json")) as f:
        info = json.load(f)
    rec = dict(spec, **info)
    rec["wall_train_s"] = time.perf_counter() - t0
    cfg = s.build_cfg(spec["norm"], spec["procs"], spec["seed"], run_dir)
    rec["lr"] = cfg.SOLVER.BASE_LR
    rec["cbn_window"] = cfg.D2NORM.CBN.BUFFER_SIZE if spec["norm"] == "CBN" else None
    rec["mabn_buffer"] = cfg.D2NORM.MABN.BUFFER_SIZE if spec["norm"] == "MABN" else None
    rec["brn_momentum"] = cfg.D2NORM.BRN.MOMENTUM if spec["norm"] == "BRN" else None
    rec["weights"] = os.path.basename(cfg.MODEL.WEIGHTS) or None
    t0, cpu0 = time.perf_counter(), time.process_time()
    if rec["status"] == "ok":
        _setup_logging(run_dir, 0)
        register_datasets(cfg)
        rec.update(_evaluate(s, spec, cfg, run_dir))
    rec["eval_s"] = time.perf_counter() - t0
    rec["eval_cpu_s"] = time.process_time() - cpu0
    rec["evals"] = len(rec.get("curve", {}))
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rec["cpu_s"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    rec["threads"] = s.threads
    rec["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    return rec


def _run_process(s, spec, run_dir):
    """Entry of a run's process: its own session (so that it and its P processes can be stopped
    together), output to <run_dir>/../<name>.log, the record to <run_dir>.result.json."""
    os.setsid()
    log = os.open(run_dir + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    rec = execute_run(s, spec, run_dir)
    with open(run_dir + ".result.json", "w") as f:
        json.dump(rec, f)


class _Bar:
    """Progress over iterations of all runs: tqdm if installed, else a rewritten stderr line."""

    def __init__(self, total, enabled):
        self.total, self.n, self.t0, self.enabled, self.tq = total, 0, time.time(), enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.tq = tqdm(total=total, desc="study", unit="it", dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                pass

    def set(self, n, note=""):
        n = min(n, self.total)
        if self.tq is not None:
            self.tq.update(n - self.tq.n)
            self.tq.set_postfix_str(note, refresh=False)
        elif self.enabled and n != self.n:
            el = time.time() - self.t0
            eta = el / n * (self.total - n) if n else float("nan")
            sys.stderr.write(
                f"\rstudy: {n}/{self.total} it, {el / 60:.1f} min, ETA {eta / 60:.1f} min {note}  "
            )
            sys.stderr.flush()
        self.n = n

    def write(self, msg):
        if self.tq is not None:
            self.tq.write(msg)
        else:
            if self.enabled:
                sys.stderr.write("\r")
            print(msg, flush=True)

    def close(self):
        if self.tq is not None:
            self.tq.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _read_progress(run_dir):
    try:
        with open(os.path.join(run_dir, "progress")) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def run_grid(
    s: StudySettings, output, jobs=1, resume=False, progress=True, keep_outputs=False, on_record=None
):
    """Run every planned run of ``s`` that ``<output>/results.jsonl`` does not hold yet.

    ``on_record(records)`` is called with all of this study's records after each finished run
    (e.g. to rewrite the report). Returns (this study's records, number of failed runs)."""
    os.makedirs(output, exist_ok=True)
    results = os.path.join(output, "results.jsonl")
    records, bad = load_records(results)
    if bad:
        print(f"note: skipped {bad} unreadable line(s) of {results} (an interrupted write)")
    sid = s.settings_id()
    planned = s.plan(sid)
    keys = {run_key(p) for p in planned}
    mine = [r for r in records if run_key(r) in keys]
    if records and not resume:
        raise SystemExit(
            f"{results} already holds {len(records)} record(s). Fix: pass --resume to "
            "continue that study, --report-only to redraw it, or choose another --output."
        )
    todo = pending_runs(planned, records)
    if todo:  # generate the synthetic splits once, not in every concurrent run
        register_datasets(s.build_cfg(todo[0]["norm"], todo[0]["procs"], todo[0]["seed"], output))
    print(
        f"{len(planned)} runs planned, {len(planned) - len(todo)} already done, {len(todo)} to go; "
        f"up to {jobs} processes at once, {s.threads} thread(s) each"
    )
    # seed by seed (an interrupted study has whole seeds), within a seed the largest runs first,
    # so that small ones fill the gaps at its end
    todo.sort(key=lambda p: (p["seed"], -p["procs"], p["norm"]))
    ctx = multiprocessing.get_context("spawn")
    runs_dir = os.path.join(output, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    bar = _Bar(sum(p["iters"] for p in todo), progress)
    running, done_iters, failed, t_start = [], 0, 0, time.time()
    try:
        while todo or running:
            used = sum(r["slots"] for r in running)
            for spec in list(todo):
                need = min(spec["procs"], jobs)
                if used + need <= jobs:
                    run_dir = os.path.join(runs_dir, run_dir_name(spec))
                    for f in (run_dir + ".result.json", run_dir + ".log"):
                        if os.path.exists(f):
                            os.remove(f)
                    proc = ctx.Process(target=_run_process, args=(s, spec, run_dir))
                    proc.start()
                    running.append(dict(spec=spec, proc=proc, slots=need, dir=run_dir, t0=time.time()))
                    todo.remove(spec)
                    used += need
            time.sleep(1.0)
            for r in list(running):
                if r["proc"].is_alive():
                    continue
                r["proc"].join()
                running.remove(r)
                done_iters += r["spec"]["iters"]
                spec, res = r["spec"], r["dir"] + ".result.json"
                name = run_dir_name(spec)
                if r["proc"].exitcode == 0 and os.path.exists(res):
                    with open(res) as f:
                        rec = json.load(f)
                    rec["wall_s"] = time.time() - r["t0"]
                    append_record(results, rec)
                    mine.append(rec)
                    bar.write(
                        f"{name}: box AP {rec.get('box_ap', float('nan')):.1f} ({rec['status']}, "
                        f"{rec['wall_s']:.0f} s, {rec['cpu_s']:.0f} CPU s)"
                    )
                    if not keep_outputs:
                        shutil.rmtree(r["dir"], ignore_errors=True)
                        os.remove(res)
                        os.remove(r["dir"] + ".log")
                    if on_record is not None:
                        on_record(list(mine))
                else:
                    failed += 1
                    bar.write(f"{name}: FAILED (exit code {r['proc'].exitcode}); log: {r['dir']}.log")
            now = done_iters + sum(_read_progress(r["dir"]) for r in running)
            bar.set(now, f"{len(running)} running, {len(todo)} waiting")
    except BaseException:
        for r in running:  # stop each run with its P training processes
            try:
                os.killpg(r["proc"].pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        raise
    finally:
        bar.close()
    print(
        f"{len(mine)} records in {results}; this invocation {(time.time() - t_start) / 60:.1f} min"
        + (f"; {failed} run(s) FAILED (see their logs; --resume retries them)" if failed else "")
    )
    return mine, failed


def run_or_report(s, output, report, report_only=False, **grid_kwargs):
    """What a study's command line does: with ``report_only``, call ``report(records, None)`` on
    the records of ``<output>/results.jsonl`` that belong to ``s``; else :func:`run_grid` (keyword
    arguments ``grid_kwargs``), calling ``report(records, wall seconds)`` after every finished
    run and at the end. Returns (records, number of failed runs)."""
    if report_only:
        keys = {run_key(p) for p in s.plan(s.settings_id())}
        records = load_records(os.path.join(output, "results.jsonl"))[0]
        records = [r for r in records if run_key(r) in keys]
        report(records, None)
        return records, 0
    t0 = time.time()
    records, failed = run_grid(
        s, output, on_record=lambda recs: report(recs, time.time() - t0), **grid_kwargs
    )
    report(records, time.time() - t0)
    return records, failed


def run_from_args(s, args, report):
    """:func:`run_or_report` with a study command line's flags: ``args.output``,
    ``args.report_only``, ``args.jobs``, ``args.resume``, ``args.no_progress``,
    ``args.keep_outputs``; ``report(args, records, wall seconds)`` writes ``args.report`` and
    ``args.plot``. Returns the records; exits with status 1 if a run failed."""
    records, failed = run_or_report(
        s,
        args.output,
        lambda recs, wall_s: report(args, recs, wall_s),
        report_only=args.report_only,
        jobs=args.jobs,
        resume=args.resume,
        progress=not args.no_progress,
        keep_outputs=args.keep_outputs,
    )
    print(f"wrote {args.report} and {args.plot} from {len(records)} record(s)")
    if failed:
        raise SystemExit(1)
    return records
