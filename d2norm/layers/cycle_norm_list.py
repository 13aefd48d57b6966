"""Per-call state for a norm that one module applies several times per forward.

RetinaNet's head applies each of its norm layers once per FPN level. A norm with state that
advances in training (CBN's history, MABN's buffers, BN's running statistics) would advance it
once per level and mix the levels' statistics. :class:`CycleNormList` holds L copies of such a
norm, one per call: call i of a forward uses copy ``i mod L``, so each copy sees one level and
advances once per step. The affine parameters γ, β are shared (the copies hold the same
``nn.Parameter`` objects), as in detectron2's ``CycleBatchNormList`` for "BN".
"""

import copy

from torch import nn

__all__ = ["CycleNormList"]


class CycleNormList(nn.ModuleList):
    """L per-call copies of one norm layer with shared γ, β; see the module docstring.

    ``CycleNormList.of(norm, L)`` builds it from ``norm`` (which becomes copy 0). The caller must
    call it a multiple of L times per forward (RetinaNet's head does: once per level), else the
    levels and copies drift apart.
    """

    def __init__(self, norms):
        super().__init__(norms)
        self._pos = 0

    @classmethod
    def of(cls, norm, length):
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"CycleNormList needs a positive number of copies, got {length!r}")
        copies = [norm] + [copy.deepcopy(norm) for _ in range(length - 1)]
        for c in copies[1:]:
            for name, p in norm.named_parameters(recurse=False):
                setattr(c, name, p)  # shared affine parameters
        return cls(copies)

    def forward(self, x):
        out = self[self._pos](x)
        self._pos = (self._pos + 1) % len(self)
        return out
