"""The project's own packages import each other in one direction: llmpipe -> stages -> pipeline, and
no module imports one that (directly or not) imports it back, not even from inside a function.

A static check (reads the import statements with ast, runs nothing), so an import hidden inside a function
to dodge a cycle at run time is caught too. A package's ``__init__`` importing its own submodules (the stage
packages exporting ``STAGE``) is not a cycle.
"""

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "llmpipe")
LAYERS = {"pipeline": 0, "stages": 1, "llmpipe": 2}  # a package may import only from its layer or below


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from a.b import c`: module a.b.c, or a.b
                target = target.rpartition(".")[0]
            if target and target != name and not target.startswith(name + "."):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_imports_itself_back():
    graph = _graph()
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail("import cycle: " + " -> ".join(exc.args[1]))


def test_imports_go_one_way_llmpipe_stages_pipeline():
    wrong = sorted(f"{a} imports {b}" for a, targets in _graph().items() for b in targets
                   if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]])
    assert not wrong, "pipeline knows nothing of stages, stages nothing of llmpipe:\n" + "\n".join(wrong)


def test_a_stage_imports_no_other_stage():
    stage_of = {name: name.split(".")[1] for name in _graph() if name.startswith("stages.") and name.count(".") >= 1}
    wrong = sorted(f"{a} imports {b}" for a, targets in _graph().items() if a in stage_of for b in targets
                   if b in stage_of and stage_of[b] != stage_of[a] and "common" not in (stage_of[a], stage_of[b]))
    assert not wrong, "a stage imports from pipeline and stages/common only:\n" + "\n".join(wrong)


def test_the_check_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    """The checker itself: a cycle through an import inside a function body is found."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline import b\n")
    (pkg / "b.py").write_text("def f():\n    from pipeline.a import x\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    monkeypatch.setattr(f"{__name__}.PACKAGES", ("pipeline",))
    graph = _graph()
    assert "pipeline.b" in graph["pipeline.a"] and graph["pipeline.b"] == {"pipeline.a"}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
