"""d2norm in detectron2's LazyConfigs: the model-preparation pass for an instantiated model,
the optimizer's parameter groups, and the check that refuses to train an unprepared model.

In a LazyConfig, wrap the model (``configs/lazy/common/mask_rcnn_fpn.py`` does)::

    model = L(d2norm.lazy.prepared)(model=L(GeneralizedRCNN)(...))
    optimizer.params = L(d2norm.lazy.param_groups)(weight_decay_norm=0.0)  # model filled in
    lr_multiplier = L(d2norm.lazy.warmup_multistep)(
        max_iter="${train.max_iter}", steps=[420, 540], warmup_iters=50
    )

and give norms as a name or with options: ``norm=d2norm.norm("CBN", buffer_size=4)``. Such a
config trains with ``train_net.py --config-file x.py key=value ...``
(:mod:`d2norm.engine.lazy_trainer`; ``configs/lazy/synthetic/`` has complete ones).
:func:`prepared` is what :func:`d2norm.build_model` does after building from a yacs config
(:func:`d2norm.prepare_model`, without a config: the options are those the layers carry).
"""

from .modeling import prepare_model
from .norms import spec_of
from .optim import get_param_groups

__all__ = ["prepared", "is_prepared", "check_prepared", "param_groups", "warmup_multistep"]

_FLAG = "_d2norm_prepared"


def prepared(model):
    """Run d2norm's model-preparation pass on the instantiated ``model`` (in place) and mark it
    prepared; returns it."""
    prepare_model(model)
    setattr(model, _FLAG, True)
    return model


def _d2norm_layers(model):
    return [path for path, m in model.named_modules() if spec_of(m) is not None]


def is_prepared(model):
    """Whether ``model`` went through :func:`prepared` (or has no d2norm layer)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return bool(getattr(model, _FLAG, False)) or not _d2norm_layers(model)


def check_prepared(model):
    """Raise ``RuntimeError`` if ``model`` has d2norm layers and skipped the preparation pass:
    training it would silently use another method (no WS, FRN's activation everywhere, ...)."""
    if not is_prepared(model):
        layers = _d2norm_layers(getattr(model, "module", model))
        raise RuntimeError(
            f"The model has {len(layers)} d2norm norm layers (e.g. {layers[:3]}) but skipped d2norm's "
            "model-preparation pass, so training would silently use other methods. Fix: wrap the "
            "LazyConfig model: model = L(d2norm.lazy.prepared)(model=L(GeneralizedRCNN)(...)) "
            "(configs/lazy/common/mask_rcnn_fpn.py), or call d2norm.lazy.prepared(model)."
        )
    return model


def param_groups(model, **kwargs):
    """detectron2's ``get_default_optimizer_params`` with every d2norm norm counted as a norm
    (``weight_decay_norm`` applies to it): :func:`d2norm.optim.get_param_groups`."""
    return get_param_groups(model, **kwargs)


def warmup_multistep(max_iter, steps, warmup_iters, gamma=0.1, warmup_factor=0.001, warmup_method="linear"):
    """The lr multiplier of a yacs config's ``SOLVER`` (``WarmupMultiStepLR``: ``STEPS``, ``GAMMA``,
    ``WARMUP_ITERS``, ``WARMUP_FACTOR``, ``WARMUP_METHOD``) as detectron2's ``build_lr_scheduler``
    makes it, for a LazyConfig's ``lr_multiplier``: steps and warm-up in iterations, so that a
    ``train.max_iter=...`` override (with ``max_iter="${train.max_iter}"``) changes the schedule
    as ``SOLVER.MAX_ITER`` does (steps beyond it are dropped, the warm-up is cut at it)."""
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    from detectron2.solver import WarmupParamScheduler

    steps = [s for s in steps if s <= max_iter]
    values = [gamma**k for k in range(len(steps) + 1)]
    scheduler = MultiStepParamScheduler(values=values, milestones=steps, num_updates=max_iter)
    return WarmupParamScheduler(scheduler, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method)
