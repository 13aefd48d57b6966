"""The study's per-run records: one JSON object per line, appended atomically, resumable."""

import json
import os

__all__ = ["run_key", "append_record", "load_records", "pending_runs", "latest_records"]


def run_key(rec):
    """What identifies a run: (norm, processes, seed, iterations, settings id)."""
    return (rec["norm"], int(rec["procs"]), int(rec["seed"]), int(rec["iters"]), rec["settings_id"])


def append_record(path, rec):
    """Append one record as a JSON line with a single ``O_APPEND`` write, then fsync.

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
    """(records, number of unreadable lines) of a JSONL file; torn or foreign lines are skipped."""
    records, bad = [], 0
    if not os.path.exists(path):
        return records, bad
    with open(path, encoding="utf-8") as f:
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


def latest_records(records):
    """One record per run key (the last one written wins)."""
    last = {}
    for r in records:
        last[run_key(r)] = r
    return list(last.values())


def pending_runs(planned, records):
    """The planned runs (dicts with the run-key fields) that have no record yet."""
    done = {run_key(r) for r in records}
    return [p for p in planned if run_key(p) not in done]
