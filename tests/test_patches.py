"""d2norm.patches: every change to detectron2 is listed, idempotent, and undone where scoped."""

import ast
import os
import re
import sys

import pytest
import torch

import d2norm  # noqa: F401
from d2norm import norms, patches

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _detectron2_state():
    """Every attribute a patch may change, by identity."""
    import detectron2.engine.defaults as defaults
    from detectron2.utils import comm

    get_norms = {
        n: m.__dict__.get("get_norm")
        for n, m in list(sys.modules.items())
        if m is not None and n.startswith("detectron2") and "get_norm" in m.__dict__
    }
    export = {n: m for n, m in sys.modules.items() if n.startswith("detectron2.export")}
    return {
        "_C": sys.modules.get("detectron2._C"),
        "get_norm": get_norms,
        "ddp": defaults.create_ddp_model,
        "local_group": comm._LOCAL_PROCESS_GROUP,
        "export": export,
    }


def test_the_list_names_every_patch_once():
    names = [p.name for p in patches.PATCHES]
    assert names == [
        "compiled_ops_standin",
        "get_norm",
        "create_ddp_model",
        "local_process_group",
        "tracing_adapter_import",
    ]
    for p in patches.PATCHES:
        assert p.why and p.target and p.scope
        assert callable(p.apply) and callable(p.is_applied)
        assert p.undo is None or callable(p.undo)


def test_import_applies_only_what_a_build_needs():
    by_name = {p.name: p for p in patches.PATCHES}
    assert by_name["get_norm"].is_applied()
    for name in ("create_ddp_model", "local_process_group", "tracing_adapter_import"):
        assert not by_name[name].is_applied(), name
    # the stand-in exactly when detectron2 cannot import without it
    standin = by_name["compiled_ops_standin"].is_applied()
    assert standin == (sys.modules.get("detectron2._C") is not None and not d2norm.compiled_ops_available())


def test_import_process_wide_patches_are_idempotent():
    before = _detectron2_state()
    assert patches.patch_get_norm() == []
    patches.install_compiled_ops_standin()
    assert _detectron2_state() == before


def test_get_norm_patch_is_undone_and_redone():
    import detectron2.layers.batch_norm as bn
    import detectron2.modeling.backbone.resnet as resnet

    restored = patches.unpatch_get_norm()
    try:
        assert "detectron2.layers.batch_norm" in restored
        assert "detectron2.modeling.backbone.resnet" in restored
        assert bn.get_norm is norms.detectron2_get_norm and resnet.get_norm is norms.detectron2_get_norm
        assert not [
            n
            for n, m in list(sys.modules.items())
            if n.startswith("detectron2") and m is not None and m.__dict__.get("get_norm") is norms.get_norm
        ]
        assert patches.unpatch_get_norm() == []
    finally:
        assert sorted(patches.patch_get_norm()) == sorted(restored)
    assert bn.get_norm is norms.get_norm and resnet.get_norm is norms.get_norm


def test_ddp_swap_is_scoped_and_restored_on_error():
    import detectron2.engine.defaults as defaults

    original = defaults.create_ddp_model
    with patches.ddp_for_cpu_models():
        assert defaults.create_ddp_model is not original
        with patches.ddp_for_cpu_models():  # nested: still restored to the true original
            pass
        # one process: the swapped function returns the model unchanged, like detectron2's
        model = torch.nn.Linear(2, 2)
        assert defaults.create_ddp_model(model, broadcast_buffers=False) is model
    assert defaults.create_ddp_model is original
    with pytest.raises(RuntimeError, match="boom"):
        with patches.ddp_for_cpu_models():
            raise RuntimeError("boom")
    assert defaults.create_ddp_model is original


def test_local_process_group_is_reset(tmp_path):
    import torch.distributed as dist

    from detectron2.utils import comm

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", world_size=1, rank=0)
    try:
        before = comm._LOCAL_PROCESS_GROUP
        with patches.local_process_group(1, 0):
            assert comm._LOCAL_PROCESS_GROUP is not None
            assert comm.get_local_size() == 1 and comm.get_local_rank() == 0
        assert comm._LOCAL_PROCESS_GROUP is before
    finally:
        dist.destroy_process_group()


def test_tracing_adapter_import_leaves_no_fake_module():
    before = {n: m for n, m in sys.modules.items() if n.startswith("detectron2.export")}
    adapter = patches.import_tracing_adapter()
    assert adapter.__name__ == "TracingAdapter" and issubclass(adapter, torch.nn.Module)
    after = {n: m for n, m in sys.modules.items() if n.startswith("detectron2.export")}
    # whatever is there now, detectron2 itself imported (a real package with its __init__)
    for name, module in after.items():
        if name not in before:
            assert "d2norm" not in (module.__doc__ or ""), name
    assert not patches.PATCHES[-1].is_applied()
    assert patches.import_tracing_adapter() is adapter  # idempotent


def test_readme_lists_exactly_the_patches():
    text = open(os.path.join(REPO, "README.md")).read()
    section = text.split("## How it fits into detectron2", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\s*[-*] \*\*`?([a-z_]+)`?\*\*", section, flags=re.M)
    assert listed == [p.name for p in patches.PATCHES]


def _package_imports():
    """{module: set of d2norm modules it imports (anywhere in the file)} for d2norm/."""
    pkg = os.path.join(REPO, "d2norm")
    graph = {}
    for root, _, files in os.walk(pkg):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
            name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(os.path.join(root, f)).read())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    for alias in node.names:
                        deps.add(target + "." + alias.name if not node.module else target)
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("d2norm"):
                    deps.add(node.module)
            graph[name] = deps
    return graph


def test_checkpoint_imports_weights_not_the_reverse():
    graph = _package_imports()
    assert "d2norm.weights" in graph["d2norm.checkpoint"]
    assert "d2norm.checkpoint" not in graph["d2norm.weights"]


@pytest.mark.parametrize(
    "module",
    [
        "d2norm.checkpoint",
        "d2norm.weights",
        "d2norm.patches",
        "d2norm.norms",
        "d2norm.engine.trainer",
        "d2norm.engine.guards",
    ],
)
def test_no_import_cycle_through(module):
    graph = _package_imports()
    seen, stack = set(), [(dep, (module, dep)) for dep in graph.get(module, ())]
    while stack:
        node, path = stack.pop()
        assert node != module, f"import cycle: {' -> '.join(path)}"
        if node in seen or node not in graph:
            continue
        seen.add(node)
        stack += [(dep, path + (dep,)) for dep in graph[node]]


def test_atomic_write_helpers_exist_once():
    hits = []
    for root, _, files in os.walk(os.path.join(REPO, "d2norm")):
        for f in files:
            if f.endswith(".py"):
                src = open(os.path.join(root, f)).read()
                hits += [f for _ in re.finditer(r"^def atomic_\w+\(", src, flags=re.M)]
    assert hits == ["checkpoint.py", "checkpoint.py"]
