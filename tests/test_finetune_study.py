"""The fine-tuning study: the upstream generator, pretraining into a real pretrained-file layout
that MODEL.WEIGHTS loads, the Welch interval against a t table, the report re-derived from a
generated JSONL, and the quick mode end to end through the command line."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers import run_tool

from d2norm.data import upstream_shapes as up
from d2norm.study import finetune_report, load_records
from d2norm.study.finetune import FinetuneSettings, variant_config
from d2norm.study.pretrain import PretrainSettings, checkpoint_path, load_or_pretrain, pretrain
from d2norm.study.stats import welch_difference


def test_upstream_stream_is_a_pure_function_of_the_index_and_balanced():
    a, la = up.upstream_batch(100, 8)
    b, lb = up.upstream_batch(104, 4)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a[4:], b) and np.array_equal(la[4:], lb)
    other, _ = up.upstream_batch(100, 8, seed=up.UPSTREAM_SEED + 1)
    assert not np.array_equal(a, other)
    labels = np.array([up.make_upstream_image(i, size=16)[1] for i in range(3200)])
    counts = np.bincount(labels, minlength=64)
    assert up.num_upstream_classes() == 64 and counts.min() > 0
    # uniform labels: chi-square over 63 degrees of freedom, far below the 0.001 critical value 103.4
    assert ((counts - 50.0) ** 2 / 50.0).sum() < 103.4
    assert up.class_name(0) == "circle/solid/warm" and up.class_name(63) == "cross/dots/cool"


def test_solid_fill_colour_family_is_in_the_pixels():
    """A solid warm object is red-dominant (BGR: channel 2 > channel 0), a cool one blue-dominant."""
    seen = set()
    for i in range(400):
        img, label = up.make_upstream_image(i)
        name = up.class_name(label)
        if "/solid/" not in name:
            continue
        centre = img[24:40, 24:40].reshape(-1, 3).astype(int)
        colours, counts = np.unique(centre, axis=0, return_counts=True)
        b, _, r = colours[counts.argmax()]  # the object's colour covers most of the centre
        family = name.split("/")[2]
        if counts.max() > 100:
            assert (r > b) == (family == "warm"), (i, name)
            seen.add(family)
    assert seen == {"warm", "cool"}


def test_welch_interval_against_the_t_table():
    """Equal n = 5 and equal sample variances: Welch's df is 2(n - 1) = 8, t(0.975, 8) = 2.306."""
    a = {s: v for s, v in enumerate([10.0, 12.0, 14.0, 16.0, 18.0])}
    b = {s: v for s, v in enumerate([1.0, 3.0, 5.0, 7.0, 9.0])}
    mean, (lo, hi), n = welch_difference(a, b)
    se = math.sqrt(np.var(list(a.values()), ddof=1) / 5 * 2)
    assert mean == pytest.approx(9.0) and n == (5, 5)
    assert hi - mean == pytest.approx(2.306 * se, rel=1e-3) and mean - lo == pytest.approx(
        2.306 * se, rel=1e-3
    )
    assert welch_difference(a, {0: 1.0})[1] is None


def test_pretrained_file_has_the_torchvision_layout_and_loads_through_model_weights(tmp_path):
    """A two-iteration pretraining: the file holds torchvision's ResNet-18 names (res2-res4 =
    layer1-layer3) and the classifier; loading it into the twin's model through the checkpointer
    (MODEL.WEIGHTS' path) puts every backbone tensor in place; a second call reuses the cache;
    the same settings give the same file."""
    import torchvision

    import d2norm
    from d2norm.checkpoint import load_pretrained_backbone

    s = PretrainSettings(
        variant="BN", config=variant_config("BN"), iters=2, batch=4, val_images=8, data_root=str(tmp_path)
    )
    path, info = load_or_pretrain(s, progress=False, log=lambda *a: None)
    assert path == checkpoint_path(s) and path.startswith(str(tmp_path)) and info["images_seen"] == 8
    state = torch.load(path)
    tv = torchvision.models.resnet18(num_classes=64).state_dict()
    expected = {k for k in tv if not k.startswith("layer4.")}
    assert set(state) == expected
    assert all(state[k].shape == tv[k].shape for k in expected if k != "fc.weight")
    cfg = FinetuneSettings(weights=(("BN", path),)).arm_cfg("SyncBN")
    model = d2norm.build_model(cfg)
    load_pretrained_backbone(model, cfg.MODEL.WEIGHTS)
    bottom_up = model.backbone.bottom_up.state_dict()
    assert torch.equal(bottom_up["res4.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(
        bottom_up["res3.0.shortcut.norm.running_var"], state["layer2.0.downsample.1.running_var"]
    )
    assert torch.equal(bottom_up["stem.conv1.norm.running_mean"], state["bn1.running_mean"])
    mtime = os.path.getmtime(path)
    assert load_or_pretrain(s, progress=False)[0] == path and os.path.getmtime(path) == mtime
    again, _ = pretrain(s, str(tmp_path / "again.pth"), progress=False, log=lambda *a: None)
    assert all(torch.equal(state[k], torch.load(again)[k]) for k in state)


def _one_step_pretrained_twin(variant, root):
    """A 1-iteration pretraining of ``variant`` (4 images) and the model of its arm's twin with that
    file loaded through the checkpointer: (settings, the file's state dict, model)."""
    import d2norm
    from d2norm.checkpoint import load_pretrained_backbone

    s = PretrainSettings(
        variant=variant, config=variant_config(variant), iters=1, batch=4, val_images=4, data_root=str(root)
    )
    path, _ = pretrain(s, progress=False, log=lambda *a: None)
    cfg = FinetuneSettings(weights=((variant, path),)).arm_cfg(variant)
    model = d2norm.build_model(cfg)
    load_pretrained_backbone(model, cfg.MODEL.WEIGHTS)
    return s, torch.load(path), model


def test_weight_standardized_file_stores_the_raw_weight(tmp_path):
    """GN+WS: the file holds X.weight = the raw (unstandardized) weight, as the WS authors' files."""
    _, state, model = _one_step_pretrained_twin("GN+WS", tmp_path)
    w = state["layer2.0.conv1.weight"]
    assert not torch.allclose(w.mean(dim=(1, 2, 3)), torch.zeros(w.shape[0]), atol=1e-4)  # not standardized
    conv = model.backbone.bottom_up.res3[0].conv1
    assert torch.equal(conv.parametrizations.weight.original, w)


def test_bcn_ws_file_is_pretrained_with_batch_statistics_and_loads_into_its_twin(tmp_path):
    """BCN+WS: pretrained in large-batch mode (the BCN authors' ImageNet files: a BatchNorm2d batch
    part), fine-tuned with the recipe's estimated statistics; the file's batch part, per-group
    affine and raw conv weight land in the twin's layers, frozen (stem, res2) or not."""
    from d2norm.layers import BatchChannelNormWS
    from d2norm.study.pretrain import build_pretrain_net, pretrain_cfg

    s, state, model = _one_step_pretrained_twin("BCN+WS", tmp_path)
    net = build_pretrain_net(pretrain_cfg(s), 64)
    modes = {m.mode for m in net.modules() if isinstance(m, BatchChannelNormWS)}
    assert modes == {"batch"}
    assert state["layer2.0.bn1.weight"].shape == (32,)  # one affine per group
    bu = model.backbone.bottom_up
    norm = bu.res3[0].conv1.norm
    assert isinstance(norm, BatchChannelNormWS) and norm.mode == "estimate"
    assert torch.equal(norm.bn.running_var, state["layer2.0.bn1.bn.running_var"])
    assert torch.equal(norm.bn.weight.detach(), state["layer2.0.bn1.bn.weight"])
    assert torch.equal(norm.weight.detach(), state["layer2.0.bn1.weight"])
    assert torch.equal(bu.res3[0].conv1.parametrizations.weight.original, state["layer2.0.conv1.weight"])
    frozen = bu.res2[0].conv1.norm  # FREEZE_AT 2: the batch part is frozen at the file's statistics
    assert torch.equal(frozen.bn.running_mean, state["layer1.0.bn1.bn.running_mean"])


def test_pretraining_builds_each_variant_with_its_norm_options():
    """The variant's D2NORM options reach the pretrained layers, not d2norm's defaults: MABN's
    buffer of 1 iteration without warm-up, the GN+WS recipe's WS convention."""
    from d2norm.study.pretrain import build_pretrain_net, pretrain_cfg

    def stem_norm(variant):
        s = PretrainSettings(variant=variant, config=variant_config(variant))
        cfg = pretrain_cfg(s)
        return cfg, build_pretrain_net(cfg, 64).backbone.stem.conv1.norm

    cfg, mabn = stem_norm("MABN")
    assert mabn.buffer_size == 1 and mabn.warmup_iters == 0
    cfg, gnws = stem_norm("GN+WS")
    assert gnws.ws_convention == cfg.D2NORM.WS.CONVENTION == "std_plus_eps"


def test_appended_arm_keeps_the_earlier_arms_runs_keys_and_order(monkeypatch):
    """BCN+WS, appended after the design: the earlier arms' planned runs (order, settings id) are
    those of the study without it; its own runs carry an id that follows its config."""
    from d2norm.study import finetune

    appended = finetune.APPENDED_ARMS
    assert finetune.ARM_ORDER[-len(appended) :] == appended
    earlier = tuple(a for a in finetune.ARM_ORDER if a not in appended)
    before = FinetuneSettings(norms=earlier).plan()
    after = FinetuneSettings().plan()
    assert [r for r in after if r["norm"] not in appended] == before
    bcn = [r for r in after if r["norm"] == "BCN+WS"]
    assert len(bcn) == 10 and {r["procs"] for r in bcn} == {1, 4}
    (bcn_id,) = {r["settings_id"] for r in bcn}
    assert bcn_id != before[0]["settings_id"]
    twin, variant, _ = finetune.ARMS["BCN+WS"]
    monkeypatch.setitem(finetune.ARMS, "BCN+WS", (twin, variant, ("D2NORM.BCN.MOVING_SPEED", "0.2")))
    changed = FinetuneSettings().plan()
    assert [r for r in changed if r["norm"] not in appended] == before
    assert {r["settings_id"] for r in changed if r["norm"] == "BCN+WS"} != {bcn_id}


def test_a_subset_of_arms_plans_the_full_grids_runs():
    """``--arms`` selects runs of the grid, it does not start another study: every planned run of
    a subset is the full grid's run with the same key (settings id included)."""
    from d2norm.study.records import run_key

    full = {run_key(r): r for r in FinetuneSettings().plan()}
    for arms in (("BN*", "BN", "CBN"), ("GN",), ("BCN+WS", "BN* random")):
        sub = FinetuneSettings(norms=arms).plan()
        assert sub and {r["norm"] for r in sub} == set(arms)
        for r in sub:
            assert full[run_key(r)] == r


def _records(table, sid="s"):
    """Records of {(arm, procs): [AP per seed]}."""
    out = []
    for (arm, procs), aps in table.items():
        for seed, ap in enumerate(aps):
            out.append(
                dict(
                    norm=arm,
                    procs=procs,
                    per_proc=8 // procs,
                    seed=seed,
                    iters=300,
                    settings_id=sid,
                    status="ok",
                    box_ap=ap,
                    cpu_s=100.0 * procs,
                )
            )
    return out


GENERATED = {
    ("BN*", 1): [60.0, 62.0, 61.0, 63.0, 59.0],
    ("BN*", 4): [61.0, 60.0, 62.0, 58.0, 60.0],
    ("BN* random", 1): [20.0, 25.0, 22.0, 18.0, 24.0],
    ("BN", 1): [60.0, 61.0, 59.0, 62.0, 60.0],
    ("BN", 4): [50.0, 52.0, 49.0, 51.0, 50.5],
    ("GN", 1): [58.0, 59.0, 60.0, 58.5, 59.5],
    ("GN", 4): [58.5, 59.0, 59.5, 58.0, 60.0],
    ("CBN", 1): [59.0, 60.0, 61.0, 60.0, 59.0],
    ("CBN", 4): [40.0, 45.0, 42.0, 38.0, 44.0],
    ("SyncBN", 4): [55.0, 62.0, 48.0, 60.0, 52.0],
}


def _welch_by_hand(a, b):
    a, b = np.array(a), np.array(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return a.mean() - b.mean(), math.sqrt(va + vb), df


def test_report_table_and_decisions_are_rederived_from_a_generated_jsonl(tmp_path):
    jsonl = tmp_path / "results.jsonl"
    with open(jsonl, "w") as f:
        for r in _records(GENERATED):
            f.write(json.dumps(r) + "\n")
    records, bad = load_records(str(jsonl))
    md = tmp_path / "report.md"
    finetune_report.write_finetune_report(str(md), records, header="# test")
    text = md.read_text()
    block = text.split("## Box AP (mean ± sample std over seeds)")[1].split("##")[0]
    rows = {ln.split("|")[1].strip(): ln.split("|")[2:-1] for ln in block.splitlines() if ln.startswith("| ")}
    for (arm, procs), aps in GENERATED.items():
        cell = rows[arm][0 if procs == 4 else 1].strip()  # columns: b=2 (P=4), b=8 (P=1)
        m = re.match(r"([\d.]+) ± ([\d.]+) \(n=(\d+)\)", cell)
        assert m, (arm, cell)
        assert float(m.group(1)) == pytest.approx(np.mean(aps), abs=0.051)
        assert float(m.group(2)) == pytest.approx(np.std(aps, ddof=1), abs=0.051)
    assert rows["SyncBN"][1].strip() == "= BN (one process)"
    dec = text.split("## Decisions")[1].split("## Does AP")[0]
    drows = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
        for ln in dec.splitlines()
        if ln.startswith("| ")
    }
    # the rule, recomputed by hand: X − BN at b = 2 (Welch) above 0 and X's own drop within ±3
    t_975 = {8: 2.306, 7: 2.365, 6: 2.447, 5: 2.571, 4: 2.776}
    for arm in ("GN", "CBN", "SyncBN", "BN*"):
        mean, se, df = _welch_by_hand(GENERATED[(arm, 4)], GENERATED[("BN", 4)])
        m = re.match(r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", drows[arm][0])
        assert float(m.group(1)) == pytest.approx(mean, abs=0.051)
        lo_df, hi_df = t_975[max(4, min(8, math.floor(df) + 1))], t_975[max(4, min(8, math.floor(df)))]
        assert mean - hi_df * se - 0.06 <= float(m.group(2)) <= mean - lo_df * se + 0.06
    assert drows["GN"][2] == "recovers"  # +8.8 above BN, own drop ≈ 0
    # BN*'s own drop, paired: d = (-1, 2, -1, 5, -1), upper bound 0.8 + 2.776 · sd / √5 > 3: not flat
    d = np.array(GENERATED[("BN*", 1)]) - np.array(GENERATED[("BN*", 4)])
    assert d.mean() + 2.776 * d.std(ddof=1) / math.sqrt(5) > 3
    assert drows["BN*"][2] == "not shown (above BN; not flat)"
    assert drows["CBN"][2].startswith("not shown (not above BN")
    assert drows["BN"][2] == "degrades"
    assert "Positive control" in dec and "**passes**" in dec
    assert re.search(r"\* CBN: .*\*\*collapses\*\*", dec)
    # post hoc: the heads' difference at b = 8, and CBN against BN at b = 2 (same head)
    heads = np.mean(GENERATED[("BN", 1)]) - np.mean(GENERATED[("BN*", 1)])
    m = re.search(r"AP\(BN, 8\) − AP\(BN\*, 8\) \(Welch\): ([+-][\d.]+) \[", dec)
    assert m and float(m.group(1)) == pytest.approx(heads, abs=0.051)
    mean, se, _ = _welch_by_hand(GENERATED[("CBN", 4)], GENERATED[("BN", 4)])
    assert mean + 2.776 * se < 0  # the interval lies below 0 at any df >= 4
    assert re.search(r"\* \*Post hoc\* — CBN against the same head, .*\*\*collapses \(same head\)\*\*", dec)


def test_no_verdict_before_every_point_has_five_seeds():
    """A rule whose points have fewer than 5 seeds says "pending" (its interval is still shown);
    the rules whose points are complete keep their verdicts."""
    table = dict(GENERATED)
    table[("BN", 4)] = GENERATED[("BN", 4)][:4]
    dec = finetune_report.decisions(_records(table))
    assert dec["BN"]["verdict"] == "pending (n < 5)" and dec["BN"]["own_drop"][2] == 4
    assert dec["GN"]["verdict"] == "pending (n < 5)" and dec["GN"]["vs_bn"][1] is not None
    assert dec["CBN"]["collapse_same_head"] == "pending (n < 5)"
    assert dec["control"]["verdict"] == "passes"
    assert dec["CBN"]["collapse"] == "collapses"  # reads BN* and CBN only, both complete


def test_quick_mode_end_to_end(tmp_path, data_root):
    """The quick preset through the command line at its smallest (BN in FPN and heads, P = 2
    and 1, 3 iterations): pretrains its tiny backbone into the data root, records every run with a
    re-estimated evaluation where the arm has BN layers, writes the report; --resume is a no-op."""
    out = tmp_path / "study"
    argv = [
        "--quick", "--arms", "BN", "--procs", "2", "1", "--iters", "3", "--total-batch", "2",
        "--jobs", "2", "--output", str(out), "--data-root", data_root, "--no-progress",
        "DATASETS.TRAIN", "('d2norm_shapes_tiny_train',)", "DATASETS.TEST", "('d2norm_shapes_tiny_val',)",
    ]  # fmt: skip

    def cli(*extra):
        return run_tool("finetune_study.py", *extra, *argv)

    first = cli()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records, bad = load_records(str(out / "results.jsonl"))
    assert bad == 0 and len(records) == 2 and all(r["status"] == "ok" for r in records)
    by = {r["procs"]: r for r in records}
    assert by[2]["images_digest"] == by[1]["images_digest"]  # the same images per seed at every P
    assert by[2]["images_per_proc"] == [1] and by[1]["images_per_proc"] == [2]
    # per-process BN in FPN + box head: evaluated also with re-estimated statistics
    assert all(r["precise_images"] and "precise_box_ap" in r and r["val_loss"] > 0 for r in records)
    assert all(r["weights"].startswith("study_R18_BN_") for r in records)
    assert any(f.startswith("study_R18_BN_") for f in os.listdir(os.path.join(data_root, "pretrained")))
    assert "## Decisions" in (out / "finetune_study.md").read_text()
    again = cli("--resume")
    assert again.returncode == 0 and "2 already done, 0 to go" in again.stdout
