"""The detectron2._C stand-in: registered only when absent, informative, and loud when called."""

import sys

import pytest

from d2norm import compat, patches


def test_standin_state_matches_the_install():
    mod = sys.modules.get("detectron2._C")
    if mod is None:  # detectron2 after v0.6 imports without its extension: nothing installed
        assert not compat.compiled_ops_available()
        assert not patches.detectron2_needs_standin()
        pytest.skip("this detectron2 imports without detectron2._C: no stand-in needed")
    if not getattr(mod, compat.STANDIN_MARKER, False):
        assert compat.compiled_ops_available()
        pytest.skip("a real detectron2._C is installed: nothing to stand in for")
    assert getattr(mod, compat.STANDIN_MARKER) is True
    assert not compat.compiled_ops_available()
    # import paths used by detectron2 work
    import detectron2.layers  # noqa: F401
    from detectron2 import _C  # noqa: F401

    # informational calls (collect_env) answer; compute ops raise a helpful error
    assert "stand-in" in mod.get_compiler_version()
    assert mod.has_cuda() is False
    with pytest.raises(compat.CompiledOpUnavailableError) as e:
        mod.nms_rotated(None, None, 0.5)
    msg = str(e.value)
    assert "nms_rotated" in msg and "without its C++/CUDA extension" in msg and "Fix" in msg


def test_install_is_idempotent_and_never_shadows_a_real_module(monkeypatch):
    before = sys.modules.get("detectron2._C")
    assert patches.install_compiled_ops_standin() == bool(getattr(before, compat.STANDIN_MARKER, False))
    assert sys.modules.get("detectron2._C") is before
    # with a real module present under the name, it is left alone
    fake_real = type(sys)("detectron2._C")
    monkeypatch.setitem(sys.modules, "detectron2._C", fake_real)
    assert patches.install_compiled_ops_standin() is False
    assert sys.modules["detectron2._C"] is fake_real


def test_collect_env_runs_with_the_standin():
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()
