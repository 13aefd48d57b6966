"""d2norm in detectron2's LazyConfigs: the model-preparation pass for an instantiated model,
the optimizer's parameter groups, and the check that refuses to train an unprepared model.

In a LazyConfig, wrap the model (``configs/lazy/common/mask_rcnn_fpn.py`` does)::

    model = L(d2norm.lazy.prepared)(model=L(GeneralizedRCNN)(...))
    optimizer.params = L(d2norm.lazy.param_groups)(weight_decay_norm=0.0)  # model filled in

and give norms as a name or with options: ``norm=d2norm.norm("CBN", buffer_size=4)``.
:func:`prepared` is what :func:`d2norm.build_model` does after building from a yacs config
(:func:`d2norm.prepare_model`, without a config: the options are those the layers carry).
"""

from .modeling import prepare_model
from .norms import spec_of
from .optim import get_param_groups

__all__ = ["prepared", "is_prepared", "check_prepared", "param_groups"]

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
