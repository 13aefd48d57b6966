"""d2norm.study: records, statistics against hand computations, the committed result, the hard
split, and a tiny study end to end (P = 2 and 1 processes train on the same images)."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers import REPO, run_tool

from d2norm import study
from d2norm.study import report

DOCS = os.path.join(REPO, "docs")


def _rec(norm, procs, seed, box, iters=10, sid="s1", total=8, **kw):
    return dict(
        norm=norm,
        procs=procs,
        per_proc=total // procs,
        seed=seed,
        iters=iters,
        settings_id=sid,
        box_ap=box,
        status="ok",
        **kw,
    )


def test_append_load_and_resume(tmp_path):
    path = str(tmp_path / "results.jsonl")
    a, b = _rec("BN", 8, 0, 1.0), _rec("GN", 8, 0, 3.0)
    study.append_record(path, a)
    with open(path, "a") as f:  # a writer killed in the middle of a line
        f.write('{"norm": "BN", "procs": 2, "se')
    study.append_record(path, b)
    records, bad = study.load_records(path)
    assert bad == 1
    assert [(r["norm"], r["box_ap"]) for r in records] == [("BN", 1.0), ("GN", 3.0)]
    assert json.loads(open(path).read().splitlines()[-1]) == b  # on its own line
    planned = [
        dict(norm=n, procs=p, seed=0, iters=10, settings_id="s1") for n in ("BN", "GN") for p in (8, 1)
    ]
    assert [(p["norm"], p["procs"]) for p in study.pending_runs(planned, records)] == [("BN", 1), ("GN", 1)]
    # other settings do not count as done
    assert len(study.pending_runs([dict(planned[0], iters=11)], records)) == 1
    assert len(study.pending_runs([dict(planned[0], settings_id="s2")], records)) == 1


def test_t_quantile_matches_the_t_table():
    # two-sided 95% critical values of Student's t (any statistics textbook table)
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042}
    for df, t in table.items():
        assert study.t_quantile(0.975, df) == pytest.approx(t, abs=2e-3)
    with pytest.raises(ValueError, match="df >= 1"):
        study.t_quantile(0.975, 0)


def test_paired_difference_and_aggregate_by_hand():
    a = {0: 10.0, 1: 12.0, 2: 17.0, 5: 99.0}  # seed 5 has no partner: left out
    b = {0: 8.0, 1: 11.0, 2: 12.0}
    mean, (lo, hi), n = study.paired_difference(a, b)
    # d = 2, 1, 5: mean 8/3, sample sd sqrt(13/3), half width 4.303 * sd / sqrt(3)
    half = 4.303 * math.sqrt(13 / 3) / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(8 / 3)
    assert lo == pytest.approx(8 / 3 - half, abs=1e-2) and hi == pytest.approx(8 / 3 + half, abs=1e-2)
    assert study.paired_difference({0: 1.0}, {0: 0.5}) == (0.5, None, 1)
    recs = [_rec("BN", 8, s, v) for s, v in a.items() if s < 5] + [_rec("BN", 1, s, v) for s, v in b.items()]
    recs.append(dict(_rec("BN", 1, 3, None), status="diverged"))
    agg = study.aggregate(recs)
    assert agg[("BN", 1)] == (13.0, pytest.approx(math.sqrt(13.0)), 3)
    assert agg[("BN", 8)][0] == pytest.approx(31 / 3) and agg[("BN", 8)][2] == 3
    table = report.ap_table(recs)
    assert "| BN | 13.0 ± 3.6 (n=3) | 10.3 ± 2.1 (n=3) (1 diverged) |" in table  # b=1 is P=8
    d1, d2 = report.difference_tables(recs)
    assert f"| BN | {-8 / 3:+.1f} [{-8 / 3 - half:+.1f}, {-8 / 3 + half:+.1f}] (n=3) |" in d1


def _table_rows(md, heading):
    block = md.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in rows[0].split("|")[1:-1]]
    return head, {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows[1:]}


@pytest.mark.parametrize("name", ["small_batch_study"])
def test_committed_table_is_rederived_from_the_committed_jsonl(name):
    """The published table equals the mean / sample std recomputed here (numpy) from the JSONL."""
    md = open(os.path.join(DOCS, f"{name}.md"), encoding="utf-8").read()
    with open(os.path.join(DOCS, f"{name}.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    assert recs, "no records"
    head, rows = _table_rows(md, "## Box AP (mean ± sample std over seeds)")
    bs = [int(re.match(r"b=(\d+)", h).group(1)) for h in head[1:]]
    cells = 0
    for norm, row in rows.items():
        for b, cell in zip(bs, row):
            vals = np.array(
                [
                    r["box_ap"]
                    for r in recs
                    if r["norm"] == norm and r["per_proc"] == b and r["status"] == "ok"
                ],
                dtype=np.float64,
            )
            if not len(vals):
                assert cell.startswith("–") or cell.startswith("= BN")
                continue
            m = re.match(r"(-?[\d.]+)(?: ± ([\d.]+))? \(n=(\d+)\)", cell)
            assert m, cell
            assert float(m.group(1)) == pytest.approx(vals.mean(), abs=0.051)
            assert int(m.group(3)) == len(vals)
            if len(vals) > 1:
                assert float(m.group(2)) == pytest.approx(vals.std(ddof=1), abs=0.051)
            cells += 1
    assert cells >= 4
    # every run of a seed trained the same 8 images per iteration, whatever P
    by_seed = {}
    for r in recs:
        assert r["images_per_iter"] == [8] and r["images_per_proc"] == [r["per_proc"]]
        by_seed.setdefault(r["seed"], set()).add(r["images_digest"])
    assert all(len(v) == 1 for v in by_seed.values())


def test_hard_split_masks_are_the_visible_pixels(tmp_path):
    import cv2
    from pycocotools.coco import COCO

    from d2norm.data.synthetic_shapes import HARD_SHAPE_CLASSES, generate_split, make_hard_image

    json_file, image_dir = generate_split(str(tmp_path), "h", 30, seed=3, size=64, kind="hard")
    again, _ = generate_split(str(tmp_path / "again"), "h", 30, seed=3, size=64, kind="hard")
    assert open(json_file).read() == open(again).read()  # deterministic
    coco = COCO(json_file)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(HARD_SHAPE_CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 2 * 30 * 0.8
    overlapping = 0
    for img in coco.loadImgs(coco.getImgIds()):
        image = cv2.imread(os.path.join(image_dir, img["file_name"])).astype(np.float64)
        masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        for a, m in zip(coco.loadAnns(coco.getAnnIds(imgIds=img["id"])), masks):
            ys, xs = np.nonzero(m)
            assert m.sum() == a["area"] >= 12
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            # one flat colour plus the pixel noise (sigma 8): the mask is one object's pixels only
            assert image[m].std(axis=0).max() < 14
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert not (masks[i] & masks[j]).any()  # visible parts are disjoint
        boxes = [a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))]
        overlapping += any(_overlap(p, q) for i, p in enumerate(boxes) for q in boxes[i + 1 :])
    assert overlapping >= 5  # occlusion happens
    areas = [a["area"] for a in anns]
    assert max(areas) / min(areas) > 5  # a range of object sizes (radii over 2.5x, occlusion)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    ia, oa = make_hard_image(rng_a, 48)
    ib, ob = make_hard_image(rng_b, 48)
    assert np.array_equal(ia, ib) and all(np.array_equal(x[1], y[1]) for x, y in zip(oa, ob))


def _overlap(p, q):
    return p[0] < q[0] + q[2] and q[0] < p[0] + p[2] and p[1] < q[1] + q[3] and q[1] < p[1] + p[3]


def test_unknown_norm_and_bad_procs_are_refused():
    with pytest.raises(ValueError, match="Valid names"):
        study.plan(
            study.StudySettings(
                config=os.path.join(REPO, "configs/synthetic/study/Base-Study.yaml"),
                norms=("BN", "NoSuchNorm"),
            )
        )
    with pytest.raises(ValueError, match="do not divide"):
        study.StudySettings(config="x", procs=(3,))


def test_per_norm_rules_follow_images_per_process():
    s = study.StudySettings(config=os.path.join(REPO, "configs/synthetic/study/Base-Study.yaml"), iters=100)
    for procs in (8, 4, 2, 1):
        b = 8 // procs
        cbn = study.build_cfg(s, "CBN", procs, 0, "/tmp/x")
        mabn = study.build_cfg(s, "MABN", procs, 0, "/tmp/x")
        bn = study.build_cfg(s, "BN", procs, 0, "/tmp/x")
        assert cbn.D2NORM.CBN.BUFFER_SIZE * b == 8 and mabn.D2NORM.MABN.BUFFER_SIZE * b == 8
        assert cbn.D2NORM.CBN.BURNIN_ITERS == mabn.D2NORM.MABN.WARMUP_ITERS == bn.SOLVER.WARMUP_ITERS == 10
        # what must not vary between points
        assert (bn.SOLVER.IMS_PER_BATCH, bn.SOLVER.BASE_LR, bn.SOLVER.MAX_ITER, bn.SOLVER.STEPS) == (
            8,
            study.build_cfg(s, "BN", 1, 0, "/tmp/x").SOLVER.BASE_LR,
            100,
            (75, 90),
        )
        assert {cbn.MODEL[k].NORM for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")} == {"CBN"}
        # BRN: the paper's ramp (plain BN first, then r_max / d_max relaxed) inside the schedule,
        # after the LR warm-up; the running statistics updated at BN's rate (torch's default)
        brn = study.build_cfg(s, "BRN", procs, 0, "/tmp/x").D2NORM.BRN
        assert bn.SOLVER.WARMUP_ITERS == brn.RAMP_START_ITER < brn.D_MAX_END_ITER < brn.R_MAX_END_ITER < 100
        assert brn.MOMENTUM == torch.nn.BatchNorm2d(1).momentum


def test_tiny_study_end_to_end(tmp_path, data_root):
    """BN with 2 images per iteration in P = 2 and P = 1 processes, through the command line: both
    runs train exactly the same images per iteration (digest of the per-iteration image ids),
    each process b of them; every run is also evaluated with re-estimated statistics, over its
    last checkpoints, with a val loss and kept predictions; the report and plot are written; a
    second call resumes without training."""
    out = tmp_path / "study"
    argv = [
        "--norms",
        "BN",
        "--procs",
        "2",
        "1",
        "--seeds",
        "0",
        "--iters",
        "3",
        "--total-batch",
        "2",
        "--jobs",
        "2",
        "--precise-images",
        "4",
        "--output",
        str(out),
        "--data-root",
        data_root,
        "--no-progress",
        "DATASETS.TRAIN",
        "('d2norm_shapes_tiny_train',)",
        "DATASETS.TEST",
        "('d2norm_shapes_tiny_val',)",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "3",
    ]

    def cli(*extra):
        return run_tool("small_batch_study.py", *extra, *argv)

    first = cli()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records, bad = study.load_records(str(out / "results.jsonl"))
    by_p = {r["procs"]: r for r in records}
    assert bad == 0 and sorted(by_p) == [1, 2] and all(r["status"] == "ok" for r in records)
    assert by_p[2]["images_per_proc"] == [1] and by_p[1]["images_per_proc"] == [2]
    assert by_p[2]["images_per_iter"] == by_p[1]["images_per_iter"] == [2]
    assert by_p[2]["images_digest"] == by_p[1]["images_digest"]
    # 0.6 / 0.8 / 0.9 / 1.0 of 3 iterations, and the last three checkpoints (every iteration here)
    assert sorted(int(k) for k in by_p[1]["curve"]) == [1, 2, 3] and by_p[1]["tail_iters"] == [1, 2, 3]
    for r in records:
        curve = r["curve"]
        assert all("box_ap" in v and "precise_box_ap" in v for v in curve.values())
        assert r["box_ap_last3"] == pytest.approx(np.mean([curve[k]["box_ap"] for k in "123"]))
        assert r["precise_box_ap"] == curve["3"]["precise_box_ap"] and r["precise_images"] == 4
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["precise_val_loss"])
        for suffix in ("", "_precise"):
            name = f"BN_P{r['procs']}_s0_i3{suffix}.json.gz"
            assert (out / "predictions" / name).stat().st_size > 0
    assert (out / "small_batch_study.md").is_file() and (out / "small_batch_study.png").stat().st_size > 1000
    assert not any((out / "runs").iterdir())  # cleaned up
    refused = cli()  # refuses to mix into an existing study without --resume
    assert refused.returncode != 0 and "--resume" in refused.stderr
    again = cli("--resume")
    assert again.returncode == 0 and "2 already done, 0 to go" in again.stdout
    assert len(open(out / "results.jsonl").read().splitlines()) == 2


#: two-sided 95% Student t quantiles t(0.975, df) from a printed t table
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
T975.update({10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131})


def _values(recs, metric, norm, b):
    return {
        r["seed"]: r[metric]
        for r in recs
        if r["norm"] == norm and r["per_proc"] == b and r["status"] == "ok" and r.get(metric) is not None
    }


def _paired(a, b):
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    if len(d) < 2:
        return (d.mean() if len(d) else None), None, len(d)
    half = T975[len(d) - 1] * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), (d.mean() - half, d.mean() + half), len(d)


def test_committed_decision_table_is_rederived_from_the_committed_jsonl():
    """Each interval and verdict of the report's decision table, recomputed here (numpy, a printed
    t table) from the JSONL records and the rule in docs/small_batch_study_header.md."""
    md = open(os.path.join(DOCS, "small_batch_study.md"), encoding="utf-8").read()
    with open(os.path.join(DOCS, "small_batch_study.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    last = {}
    for r in recs:
        last[(r["norm"], r["procs"], r["seed"], r["iters"], r["settings_id"])] = r
    recs = list(last.values())
    _, rows = _table_rows(md, "## Decision\n")
    assert len(rows) == 6
    pattern = re.compile(r"AP\(([^,]+), (\d+)\) − AP\(([^,]+), (\d+)\)( within ±3)?: (.*)")
    for claim, (comparisons, verdict, _) in rows.items():
        ok = True
        for comp in comparisons.split("; "):
            m = pattern.match(comp)
            if m:
                na, ba, nb, bb, within, shown = m.groups()
                a = _values(recs, "box_ap", na, int(ba))
                b = _values(recs, "box_ap", nb, int(bb))
            else:  # the evaluation-statistics claim: per-seed gains of re-estimation at b = 1 and 8
                assert comp.startswith("[AP_re − AP](BN, 1) − [AP_re − AP](BN, 8)"), comp
                shown, within = comp.split(": ", 1)[1], None
                gain = {}
                for bb in (1, 8):
                    pre = _values(recs, "precise_box_ap", "BN", bb)
                    std = _values(recs, "box_ap", "BN", bb)
                    gain[bb] = {s: pre[s] - std[s] for s in set(pre) & set(std)}
                a, b = gain[1], gain[8]
            mean, ci, n = _paired(a, b)
            if n == 0:
                assert shown.startswith("–")
                ok = False
                continue
            nums = [float(x) for x in re.findall(r"[-+]?\d+\.\d", shown)]
            assert nums[0] == pytest.approx(mean, abs=0.051) and f"(n={n})" in shown
            if ci is None:
                ok = False
                continue
            assert nums[1] == pytest.approx(ci[0], abs=0.051) and nums[2] == pytest.approx(ci[1], abs=0.051)
            ok = ok and ((-3 <= ci[0] and ci[1] <= 3) if within else ci[0] > 0)
        assert verdict == ("**established**" if ok else "not established"), claim


def test_the_committed_records_are_this_study():
    """The study's settings id (a hash of the merged config, schedule and generator) is the one
    every committed record carries: a config key added to d2norm must not orphan the records that
    ``--resume`` continues (new option nodes are hashed only when set away from their defaults)."""
    with open(os.path.join(DOCS, "small_batch_study.jsonl"), encoding="utf-8") as f:
        ids = {json.loads(ln)["settings_id"] for ln in f if ln.strip()}
    s = study.StudySettings(config=os.path.join(REPO, "configs", "synthetic", "study", "Base-Study.yaml"))
    assert ids == {study.settings_id(s)}
