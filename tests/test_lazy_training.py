"""LazyConfig training through ``train_net.py``'s entry point (:func:`d2norm.engine.launch.cli`):
a lazy recipe and its yacs twin give the trainer the same settings and train the same
iterations; ``--resume`` continues a lazy run exactly; models that skipped preparation refuse
to train under detectron2's plain training loop; d2norm's layer messages reach ``log.txt``."""

import copy
import json
import logging
import math
import os
import types

import pytest
import torch
from helpers import CONFIGS
from omegaconf import ListConfig, OmegaConf

import d2norm
from d2norm import model_zoo
from d2norm.engine.launch import cli
from d2norm.engine.lazy_trainer import TRAINER_KEYS, LazyTrainer, load_lazy_config, trainer_config

from detectron2.config import LazyConfig, instantiate

TWINS = [
    "synthetic/mask_rcnn_R_18_FPN_GN",
    "synthetic/mask_rcnn_R_18_FPN_CBN",
    "synthetic/mask_rcnn_R_18_FPN_MABN",
    "synthetic/mask_rcnn_R_18_FPN_GN_WS",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_cbn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn_ws",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_syncbn",
    "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_mabn",
]


def _lazy_file(name):
    if "/" not in name:
        name = "synthetic/" + name
    return os.path.join(CONFIGS, "lazy", name + ".py")


def _yacs(name):
    if "/" not in name:
        name = "synthetic/" + name
    return model_zoo.get_config(f"{name}.yaml")


def _plain(value, depth=0):
    """``value`` as nested tuples / dicts (an object: its class and attributes, 4 levels deep),
    lists and tuples alike."""
    if isinstance(value, (list, tuple, ListConfig)):
        return tuple(_plain(v, depth) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, depth) for k, v in value.items()}
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return (type(value).__name__, _plain(vars(value), depth + 1) if depth < 4 else None)
    return value


def _get(node, dotted):
    for part in dotted.split("."):
        node = node[part]
    return node


def _call_args(fn, spec):
    """The arguments a LazyCall ``spec`` of ``fn`` calls it with, defaults filled in (the spec's
    own values resolved; nested calls left as specs)."""
    import inspect

    given = {k: v for k, v in spec.items() if k != "_target_"}
    bound = inspect.signature(fn).bind_partial(**given)
    bound.apply_defaults()
    return dict(bound.arguments)


def _yacs_loader_args(cfg, monkeypatch):
    """What detectron2's yacs path passes to ``build_detection_{train,test}_loader`` and to
    ``get_detection_dataset_dicts`` for ``cfg`` (``_train_loader_from_config``,
    ``_test_loader_from_config``), recorded without reading a dataset."""
    from detectron2.data import build as data_build

    calls = []

    def record(names, **kwargs):
        calls.append(dict(names=names, **kwargs))
        return [{"file_name": "x.jpg", "height": 8, "width": 8, "image_id": 0, "annotations": []}]

    monkeypatch.setattr(data_build, "get_detection_dataset_dicts", record)
    train = data_build._train_loader_from_config(cfg)
    test = data_build._test_loader_from_config(cfg, cfg.DATASETS.TEST[0])
    monkeypatch.undo()
    return train, test, calls


def _yacs_evaluator_args(cfg, monkeypatch):
    """The arguments d2norm's yacs trainer constructs its COCO evaluator with for ``cfg``'s first
    test set (:func:`d2norm.engine.data.build_evaluator`), recorded without reading a dataset (a
    synthetic split not generated here counts as what it is once registered: COCO instances)."""
    from d2norm.engine.data import build_evaluator

    from detectron2 import data, evaluation

    catalog, calls = data.MetadataCatalog, []

    def metadata(name):
        if name.startswith("d2norm_shapes") and "evaluator_type" not in catalog.get(name).as_dict():
            return {"evaluator_type": "coco"}
        return catalog.get(name)

    monkeypatch.setattr(data, "MetadataCatalog", types.SimpleNamespace(get=metadata))
    monkeypatch.setattr(evaluation, "COCOEvaluator", lambda *a, **k: calls.append((a, k)))
    build_evaluator(cfg, cfg.DATASETS.TEST[0])
    monkeypatch.undo()
    ((args, kwargs),) = calls
    return dict(dataset_name=args[0], **kwargs)


@pytest.mark.parametrize("name", TWINS)
def test_lazy_recipe_gives_the_trainer_the_yacs_recipe_settings(name, monkeypatch):
    """Trainer keys, data loaders (datasets, mapper: sizes, format, augmentations; batch,
    workers), evaluator, the optimizer's lr and weight decay of every parameter of the built
    model and the lr schedule of every iteration equal those detectron2 builds from the yacs
    twin (``_train_loader_from_config``, ``DatasetMapper(cfg)``, d2norm's ``build_optimizer``
    and ``build_evaluator``, ``build_lr_scheduler``), also after a ``train.max_iter`` override."""
    from d2norm.optim import build_optimizer

    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.solver import LRMultiplier, build_lr_scheduler

    conf = load_lazy_config(_lazy_file(name))
    model = instantiate(conf.model)  # the lazy recipe's model (test_lazy: equal to the twin's)
    for max_iter in (None, 20):
        cfg = _yacs(name)
        conf = load_lazy_config(_lazy_file(name), [f"train.max_iter={max_iter}"] if max_iter else [])
        if max_iter:
            cfg.SOLVER.MAX_ITER = max_iter
        view = trainer_config(conf)
        for key, _ in TRAINER_KEYS:
            want = _get(cfg, key)
            if key == "OUTPUT_DIR":  # lazy runs write next to the yacs runs, under output/lazy/
                want = want.replace("output/", "output/lazy/", 1)
            assert _get(view, key) == want, key
        # the trainer's other settings keep the defaults; so must the twin's
        assert view.TEST.PRECISE_BN.ENABLED == cfg.TEST.PRECISE_BN.ENABLED
        assert not cfg.SOLVER.CLIP_GRADIENTS.ENABLED and not cfg.SOLVER.NESTEROV
        # data: what detectron2 passes to the loaders for the twin
        train, test, dataset_calls = _yacs_loader_args(cfg, monkeypatch)
        lazy_train = _call_args(build_detection_train_loader, conf.dataloader.train)
        lazy_test = _call_args(build_detection_test_loader, conf.dataloader.test)
        assert _plain(train["mapper"]) == _plain(instantiate(conf.dataloader.train.mapper))
        assert _plain(test["mapper"]) == _plain(instantiate(conf.dataloader.test.mapper))
        assert lazy_train["sampler"] is None  # TrainingSampler, as the twin's:
        assert type(train["sampler"]).__name__ == cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
        for key in ("total_batch_size", "aspect_ratio_grouping", "num_workers"):
            assert lazy_train[key] == train[key], key
        assert lazy_test["num_workers"] == test["num_workers"]
        for lazy_dataset, yacs_dataset in zip(
            (conf.dataloader.train.dataset, conf.dataloader.test.dataset), dataset_calls
        ):
            lazy_dataset = OmegaConf.to_container(lazy_dataset, resolve=True)
            names = lazy_dataset.pop("names")
            assert ((names,) if isinstance(names, str) else tuple(names)) == tuple(yacs_dataset.pop("names"))
            for key, value in yacs_dataset.items():  # filter_empty, min_keypoints, proposal_files
                assert lazy_dataset.get(key, value) == value, key
        yacs_eval = _yacs_evaluator_args(cfg, monkeypatch)
        lazy_eval = OmegaConf.to_container(conf.dataloader.evaluator, resolve=True)
        assert lazy_eval["dataset_name"] == yacs_eval["dataset_name"]
        assert tuple(lazy_eval["tasks"]) == tuple(yacs_eval["tasks"])
        assert instantiate(conf.dataloader.evaluator.use_fast_impl) == yacs_eval["use_fast_impl"]
        # optimizer: every parameter's lr and weight decay
        a = build_optimizer(cfg, model)
        spec = copy.deepcopy(conf.optimizer)
        spec.params.model = model
        b = instantiate(spec)
        assert type(a) is type(b)
        assert {k: v for k, v in a.defaults.items()} == {k: v for k, v in b.defaults.items()}

        def per_param(opt):
            return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

        pa, pb = per_param(a), per_param(b)
        names = {id(p): n for n, p in model.named_parameters()}
        assert pa.keys() == pb.keys()
        assert {names[i]: pb[i] for i in pb} == {names[i]: pa[i] for i in pa}
        # lr of every iteration
        sa = build_lr_scheduler(cfg, a)
        sb = LRMultiplier(b, instantiate(conf.lr_multiplier), max_iter=view.SOLVER.MAX_ITER)
        lrs = []
        for _ in range(cfg.SOLVER.MAX_ITER):
            lrs.append(tuple(g["lr"] for g in a.param_groups) + tuple(g["lr"] for g in b.param_groups))
            sa.step(), sb.step()
        n = len(a.param_groups)
        assert all(x[:n] == pytest.approx(x[n:], rel=1e-12) for x in lrs)
        assert len({x[0] for x in lrs}) > 3  # warm-up (and steps) covered


@pytest.mark.parametrize("name", [n for n in TWINS if n.startswith("COCO")])
def test_train_net_lazy_setup_accepts_the_coco_recipes(name, tmp_path):
    """``train_net.py --config-file <recipe>.py key=value``: the setup (load, overrides, the
    fields training and evaluation need) passes, from the packaged name as from the path."""
    from d2norm.engine.launch import parse_args, setup_lazy

    path = model_zoo.get_config_file(f"lazy/{name}.py")
    assert model_zoo.get_config(f"lazy/{name}.py").train.max_iter >= 90000
    for extra in ([], ["--eval-only"]):
        args = parse_args(["--config-file", path, *extra, f"train.output_dir={tmp_path}", "train.max_iter=7"])
        try:
            conf = setup_lazy(args)
        finally:
            logging.getLogger("d2norm").propagate = True
            logging.getLogger("detectron2").propagate = True
        view = trainer_config(conf)
        assert view.SOLVER.MAX_ITER == 7 and view.OUTPUT_DIR == str(tmp_path)
        assert view.DATASETS.TRAIN == ("coco_2017_train",) and view.DATASETS.TEST == ("coco_2017_val",)


def _run(argv):
    try:
        cli(argv)
    finally:  # detectron2's setup_logger stops propagation; other tests read records via the root
        logging.getLogger("d2norm").propagate = True
        logging.getLogger("detectron2").propagate = True


def _losses(out):
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r["total_loss"] for r in rows if "total_loss" in r}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# CBN leaves burn-in after iteration 1, so iterations 2, 3 use (and resume needs) its history
_CBN = "{_target_:d2norm.norm,name:CBN,buffer_size:2,burnin:1}"
_LAZY_TINY = [
    "dataloader.train.dataset.names=d2norm_shapes_tiny_train",
    "dataloader.train.total_batch_size=2",
    "dataloader.evaluator=null",
    "train.max_iter=4",
    "train.checkpointer.period=2",
    *(
        f"model.model.backbone.{site}={_CBN}"
        for site in ("bottom_up.stem.norm", "bottom_up.stages.norm", "norm")
    ),
]


def test_lazy_and_yacs_cbn_recipes_train_the_same_and_lazy_resume_is_exact(tmp_path, data_root):
    init = str(tmp_path / "init.pth")
    cfg = _yacs("mask_rcnn_R_18_FPN_CBN")
    torch.save({"model": d2norm.build_model(cfg).state_dict()}, init)  # the same initial weights
    yacs_out, lazy_out, resumed_out = (str(tmp_path / d) for d in ("yacs", "lazy", "resumed"))
    # yacs twin
    _run(
        ["--config-file", os.path.join(CONFIGS, "synthetic", "mask_rcnn_R_18_FPN_CBN.yaml")]
        + ["OUTPUT_DIR", yacs_out, "MODEL.WEIGHTS", init, "D2NORM.DATA.ROOT", data_root]
        + [
            "DATASETS.TRAIN",
            "('d2norm_shapes_tiny_train',)",
            "DATASETS.TEST",
            "()",
            "SOLVER.IMS_PER_BATCH",
            "2",
        ]
        + ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "D2NORM.CBN.BURNIN_ITERS", "1"]
    )
    lazy = ["--config-file", _lazy_file("mask_rcnn_R_18_FPN_CBN"), *_LAZY_TINY]
    lazy += [f"train.init_checkpoint={init}", f"train.data_root={data_root}"]
    _run(lazy + [f"train.output_dir={lazy_out}"])
    a, b = _losses(yacs_out), _losses(lazy_out)  # metrics.json: the median of the 4 losses
    assert sorted(a) == sorted(b) == [3] and b[3] == pytest.approx(a[3], rel=1e-5), (a, b)
    wa, wb = (
        _weights(os.path.join(yacs_out, "model_final.pth")),
        _weights(os.path.join(lazy_out, "model_final.pth")),
    )
    assert wa.keys() == wb.keys()
    assert any(k.endswith("hist_sqmean") for k in wb)  # CBN history is checkpointed
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    # exact resume through the lazy path: from the lazy run's iteration-1 checkpoint to the end
    os.makedirs(resumed_out)
    ckpt = "model_0000001.pth"
    with open(os.path.join(lazy_out, ckpt), "rb") as src, open(os.path.join(resumed_out, ckpt), "wb") as dst:
        dst.write(src.read())
    with open(os.path.join(resumed_out, "last_checkpoint"), "w") as f:
        f.write(ckpt)
    _run(["--resume"] + lazy + [f"train.output_dir={resumed_out}"])
    assert sorted(_losses(resumed_out)) == [3]  # iterations 2, 3 only
    wc = _weights(os.path.join(resumed_out, "model_final.pth"))  # weights and norm state
    assert wc.keys() == wb.keys() and all(torch.equal(wc[k], wb[k]) for k in wb)
    with open(os.path.join(lazy_out, "log.txt")) as f:
        log = f.read()
    assert "d2norm.engine.trainer INFO: Model:\nGeneralizedRCNN(" in log  # the model printout


def _site_norms(conf, norm):
    m = conf.model.model
    m.backbone.bottom_up.stem.norm = m.backbone.bottom_up.stages.norm = m.backbone.norm = norm
    m.roi_heads.box_head.conv_norm = m.roi_heads.mask_head.conv_norm = norm


def _one_batch():
    from detectron2.data import DatasetCatalog, DatasetMapper

    cfg = _yacs("mask_rcnn_R_18_FPN_GN")
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    mapper = DatasetMapper(cfg, True)
    return [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get("d2norm_shapes_tiny_train")[:2]]


@pytest.mark.parametrize(
    "norm,freeze_at,match",
    [
        ("FRN", 0, r"'FRN' layer FilterResponseNorm2d\(64.*carries its activation"),
        ("EvoNorm-S0", 0, r"'EvoNorm-S0' layer EvoNormS0\(64.*carries its activation"),
        ("BRN", 2, r"'BRN' layer BatchRenorm2d\(64.*all its parameters frozen"),
    ],
)
def test_unprepared_model_refuses_to_train_in_detectron2s_plain_loop(data_root, norm, freeze_at, match):
    """detectron2's ``lazyconfig_train_net.py`` loop (instantiate, ``SimpleTrainer``) on a model
    that skipped ``d2norm.lazy.prepared`` stops at its first step; the prepared model trains."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    conf = LazyConfig.load(_lazy_file("mask_rcnn_R_18_FPN_GN"))
    _site_norms(conf, d2norm.norm(norm, num_groups=16) if norm == "EvoNorm-S0" else norm)
    conf.model.model.backbone.bottom_up.freeze_at = freeze_at
    batch = _one_batch()
    for model, refuses in ((instantiate(conf.model.model), True), (instantiate(conf.model), False)):
        params = [p for p in model.parameters() if p.requires_grad]
        trainer = SimpleTrainer(model, iter([batch]), torch.optim.SGD(params, lr=0.01))
        with EventStorage(0):
            if refuses:
                with pytest.raises(RuntimeError, match=match + r".*d2norm\.lazy\.prepared"):
                    trainer.run_step()
            else:
                trainer.run_step()
    # the same layer constructed directly, in a user's own module, trains without the pass
    from d2norm.layers import BatchRenorm2d, EvoNormS0, FilterResponseNorm2d

    layer = {
        "FRN": FilterResponseNorm2d(8),
        "EvoNorm-S0": EvoNormS0(8, num_groups=4),
        "BRN": BatchRenorm2d(8),
    }[norm]
    own = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), layer).train()
    own(torch.randn(2, 3, 8, 8)).sum().backward()


def test_layer_messages_reach_log_txt(tmp_path, data_root):
    """A d2norm layer's message during a trainer run (CBN: a history that does not fit its conv,
    loaded outside the checkpointer) is in ``log.txt``, through the "d2norm" logger."""
    from detectron2.engine import HookBase

    class LoadForeignHistory(HookBase):
        def before_train(self):
            path, cbn = next(
                (p, m) for p, m in self.trainer.model.named_modules() if hasattr(m, "hist_sqmean")
            )
            other = d2norm.build_norm("CBN", cbn.num_features, buffer_size=4)
            conv = torch.nn.Conv2d(cbn.num_features, cbn.num_features, 1, bias=False)
            other.prepare_preceding_conv(conv)
            state = other.state_dict()
            state["hist_count"] = torch.tensor(2)  # a window in progress
            cbn.load_state_dict(state, strict=False)

    conf_args = ["--config-file", _lazy_file("mask_rcnn_R_18_FPN_CBN")] + _LAZY_TINY[:4]
    conf_args += ["train.max_iter=1", f"train.data_root={data_root}", f"train.output_dir={tmp_path}"]
    from d2norm.data.synthetic_shapes import register_datasets
    from d2norm.engine.launch import parse_args, setup_lazy

    args = parse_args(conf_args)
    try:
        conf = setup_lazy(args)
        register_datasets(trainer_config(conf))
        trainer = LazyTrainer(conf)
        trainer.register_hooks([LoadForeignHistory()])
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        logging.getLogger("d2norm").propagate = True
        logging.getLogger("detectron2").propagate = True
    with open(tmp_path / "log.txt") as f:
        log = f.read()
    assert "d2norm.layers.cross_iteration_batch_norm WARNING: CrossIterationBatchNorm2d" in log
    assert "the stored CBN history does not fit the bound conv" in log


@pytest.mark.slow
def test_a_coco_lazy_recipe_trains_through_train_net(tmp_path, data_root):
    """``train_net.py --config-file configs/lazy/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn.py``
    with overrides for the CPU and the synthetic tiny split (COCO itself is not here): two
    iterations with finite losses and a final checkpoint with the GN heads' parameters."""
    out = str(tmp_path / "out")
    _run(
        ["--config-file", _lazy_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_gn")]
        + ["dataloader.train.dataset.names=d2norm_shapes_tiny_train", "dataloader.train.total_batch_size=2"]
        + ["dataloader.train.num_workers=0", "dataloader.evaluator=null"]
        + ["dataloader.train.mapper.augmentations.0.short_edge_length=[64]"]
        + ["dataloader.train.mapper.augmentations.0.max_size=64", "train.max_iter=2"]
        + [
            "train.device=cpu",
            "train.init_checkpoint=",
            f"train.data_root={data_root}",
            f"train.output_dir={out}",
        ]
    )
    with open(os.path.join(out, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    losses = [r["total_loss"] for r in rows if "total_loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    weights = _weights(os.path.join(out, "model_final.pth"))
    assert "roi_heads.box_head.conv1.norm.weight" in weights  # GN in the 4conv1fc head
