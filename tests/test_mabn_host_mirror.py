"""MABN keeps its iteration count on the host (no device read per step) and notices when
something else writes the ``iters`` buffer (checkpoint load, ``fill_``, the trainer's restore)."""

import pytest
import torch

from d2norm.layers import MovingAverageBatchNorm2d

SHAPE = (2, 3, 4, 5)


def _step(mod, x):
    mod(x.requires_grad_()).sum().backward()


def test_buffer_written_from_outside_is_followed():
    B = 4
    mod = MovingAverageBatchNorm2d(3, buffer_size=B, warmup_iters=0)
    x = torch.randn(SHAPE)
    _step(mod, x)
    mod.iters.fill_(41)  # e.g. restored by a guard or written by a script
    before = mod.buffer_x2.clone()
    _step(mod, x)
    assert int(mod.iters) == 42
    changed = [i for i in range(B) if not torch.equal(before[i], mod.buffer_x2[i])]
    assert changed == [42 % B]  # the slot of t = 42
    torch.testing.assert_close(mod.buffer_x2[42 % B], (x * x).mean((0, 2, 3)))


def test_no_host_read_after_dtype_move_or_in_steady_state(monkeypatch):
    mod = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0).double()
    x = torch.randn(SHAPE, dtype=torch.float64)

    def boom(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    for _ in range(3):
        _step(mod, x)
    monkeypatch.undo()
    assert int(mod.iters) == 3


def test_state_dict_load_resynchronizes():
    a = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0)
    b = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0)
    x = torch.randn(SHAPE)
    for _ in range(5):
        _step(a, x)
    b.load_state_dict(a.state_dict())
    _step(a, x)
    _step(b, x)
    assert int(a.iters) == int(b.iters) == 6
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("scaled", [False, True])
def test_psi_ring_under_a_loss_scale_skips_overflow(scaled):
    """Under a loss scale the overflowed channel keeps its previous entry; unscaled, psi is stored."""
    mod = MovingAverageBatchNorm2d(3, buffer_size=2, warmup_iters=0)
    x = torch.randn(SHAPE)
    _step(mod, x)
    before = mod.buffer_gz.clone()
    mod.grad_scale = 4.0 if scaled else None
    y = mod(x.clone().requires_grad_())
    g = torch.ones_like(y)
    g[:, 1] = float("inf")
    y.backward(g)
    slot = int(mod.iters) % 2
    assert torch.isfinite(mod.buffer_gz[slot, [0, 2]]).all()
    if scaled:
        assert torch.equal(mod.buffer_gz[slot, 1], before[slot, 1])
    else:
        assert not torch.isfinite(mod.buffer_gz[slot, 1])
