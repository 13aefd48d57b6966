"""d2norm: normalization methods for small-batch detection in detectron2.

``import d2norm`` does what any model build needs and nothing else: it registers a stand-in for
``detectron2._C`` where detectron2 cannot be imported without one, and points detectron2's
``get_norm`` call sites at d2norm's names (``NORM: "GN+WS"``, ``"CBN"``, ``"MABN"``, ...).
The names, their options and what each norm can do are the norm table, :mod:`d2norm.norms`;
``d2norm.norm("CBN", buffer_size=4)`` is a norm with its options, for any ``norm=`` argument.
Every change d2norm makes to detectron2 is listed in :mod:`d2norm.patches`.
"""

from .patches import install_compiled_ops_standin, patch_get_norm

install_compiled_ops_standin()

from .compat import compiled_ops_available  # noqa: E402
from .config import add_d2norm_config  # noqa: E402
from .modeling import build_model, convert_frozen_norms, prepare_model  # noqa: E402
from .norms import NORMS, bind_norms, build_norm, norm  # noqa: E402

patch_get_norm()

from . import lazy  # noqa: E402  (d2norm.lazy: LazyConfig models)

__version__ = "0.1.0"
__all__ = [
    "add_d2norm_config",
    "build_model",
    "prepare_model",
    "convert_frozen_norms",
    "build_norm",
    "norm",
    "bind_norms",
    "patch_get_norm",
    "compiled_ops_available",
    "NORMS",
    "lazy",
]
