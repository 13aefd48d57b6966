"""tools/small_batch_study.py: records, resume, the table writer, and one tiny run end to end."""
import importlib.util
import json
import math
import os

import pytest

from helpers import REPO


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "_d2norm_small_batch_study", os.path.join(REPO, "tools", "small_batch_study.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study = _load_study()


def _rec(norm, batch, seed, box, mask, iters=10, sid="s1", **kw):
    return dict(norm=norm, batch=batch, seed=seed, iters=iters, settings_id=sid, box_ap=box,
                mask_ap=mask, status="ok", **kw)


def test_append_load_and_resume(tmp_path):
    path = str(tmp_path / "results.jsonl")
    a, b = _rec("BN", 1, 0, 1.0, 2.0), _rec("GN", 1, 0, 3.0, 4.0)
    study.append_record(path, a)
    with open(path, "a") as f:  # a writer killed in the middle of a line
        f.write('{"norm": "BN", "batch": 2, "se')
    study.append_record(path, b)
    records, bad = study.load_records(path)
    assert bad == 1
    assert [(r["norm"], r["box_ap"]) for r in records] == [("BN", 1.0), ("GN", 3.0)]
    # the record after the torn line starts on its own line
    lines = open(path).read().splitlines()
    assert json.loads(lines[-1]) == b
    planned = [dict(norm=n, batch=bs, seed=0, iters=10, settings_id="s1")
               for n in ("BN", "GN") for bs in (1, 2)]
    todo = study.pending_runs(planned, records)
    assert [(p["norm"], p["batch"]) for p in todo] == [("BN", 2), ("GN", 2)]
    # other settings (iterations, config) do not count as done
    assert len(study.pending_runs([dict(planned[0], iters=11)], records)) == 1
    assert len(study.pending_runs([dict(planned[0], settings_id="s2")], records)) == 1


def test_table_mean_and_sample_std(tmp_path):
    recs = [
        _rec("BN", 1, 0, 10.0, 5.0), _rec("BN", 1, 1, 12.0, 6.0), _rec("BN", 1, 2, 17.0, 7.0),
        _rec("BN", 8, 0, 30.0, 20.0), _rec("BN", 8, 1, 34.0, 24.0),
        _rec("GN", 1, 0, 25.0, 15.0),
        dict(_rec("GN", 8, 0, None, None), status="diverged"),
    ]
    # by hand: BN b1 box 10, 12, 17 -> mean 13, sample var ((-3)^2 + (-1)^2 + 4^2) / 2 = 13
    agg = study.aggregate(recs, "box_ap")
    mean, std, n = agg[("BN", 1)]
    assert (mean, n) == (13.0, 3) and math.isclose(std, math.sqrt(13.0))
    mean, std, n = agg[("BN", 8)]  # 30, 34 -> mean 32, var (4 + 4) / 1 = 8
    assert (mean, n) == (32.0, 2) and math.isclose(std, math.sqrt(8.0))
    assert agg[("GN", 1)] == (25.0, None, 1)
    assert ("GN", 8) not in agg  # a failed run is not averaged
    mask = study.aggregate(recs, "mask_ap")
    assert mask[("BN", 1)][0] == 6.0 and math.isclose(mask[("BN", 1)][1], 1.0)

    table = study.metric_table(recs, "box_ap")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines()[2:]}
    assert rows["BN"] == ["13.0 ± 3.6 (n=3)", "32.0 ± 2.8 (n=2)"]
    assert rows["GN"] == ["25.0 (n=1)", "– (1 failed)"]
    assert table.splitlines()[0] == "| norm | batch 1 | batch 8 |"

    md, png = str(tmp_path / "study.md"), str(tmp_path / "study.png")
    study.write_markdown(md, recs, {"quick": True, "settings": "* test"})
    text = open(md).read()
    assert "quick mode" in text and "13.0 ± 3.6 (n=3)" in text
    assert "6.0 ± 1.0 (n=3)" in text and "22.0 ± 2.8 (n=2)" in text  # mask AP
    assert "BN: AP(batch 8) − AP(batch b) = batch 1: +19.0" in text
    study.write_plot(png, recs)
    assert os.path.getsize(png) > 1000


def test_study_runs_and_resumes(tmp_path, data_root):
    out = tmp_path / "study"
    argv = ["--norms", "GN", "--batch-sizes", "1", "--seeds", "0", "--iters", "2",
            "--output", str(out), "--data-root", data_root, "--no-progress",
            "DATASETS.TRAIN", "('d2norm_shapes_tiny_train',)",
            "DATASETS.TEST", "('d2norm_shapes_tiny_val',)"]  # config overrides come last
    records = study.main(argv)
    assert len(records) == 1
    rec = records[0]
    assert (rec["norm"], rec["batch"], rec["seed"], rec["iters"], rec["status"]) == ("GN", 1, 0, 2, "ok")
    assert rec["lr"] == pytest.approx(0.02 * 1 / 4)  # the linear rule
    assert rec["mabn_buffer"] == 16
    for k in ("box_ap", "mask_ap"):
        assert 0.0 <= rec[k] <= 100.0
    lines = open(out / "results.jsonl").read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["norm"] == "GN"
    assert (out / "small_batch_study.md").is_file() and (out / "small_batch_study.png").is_file()
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())  # cleaned up

    with pytest.raises(SystemExit):  # refuses to mix into an existing study without --resume
        study.main(argv)
    again = study.main(["--resume"] + argv)  # nothing left to do: no training
    assert len(again) == 1 and again[0]["finished"] == rec["finished"]
    assert len(open(out / "results.jsonl").read().splitlines()) == 1
