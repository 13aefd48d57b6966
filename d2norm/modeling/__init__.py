"""Model surgery: building a model with d2norm's norms and preparing it.

detectron2's ``get_norm(name, C)`` never sees the conv a norm follows, the module that applies
it, or the model around it; what needs them happens here, after detectron2 has built the model:

* :mod:`.prepare`: :func:`build_model` and the one preparation pass, :func:`prepare_model`;
* :mod:`.link`: which conv feeds a norm, and the first-forward check that it does;
* :mod:`.freeze`: frozen norms (:func:`convert_frozen_norms`);
* :mod:`.retinanet`: per-level copies of the norms in RetinaNet's head;
* :mod:`.sites`: per-call-site placement of FRN's / EvoNorm-S0's activation;
* :mod:`.backbone`: ``build_study_resnet_fpn_backbone`` (an FPN over res2-res4), registered here.
"""

from . import backbone  # noqa: F401  (registers build_study_resnet_fpn_backbone)
from .freeze import convert_frozen_norms
from .link import find_feeding_conv
from .prepare import build_model, check_norm_options, prepare_model

__all__ = ["build_model", "prepare_model", "check_norm_options", "convert_frozen_norms", "find_feeding_conv"]
