"""nolabels.methods.coder as a package: one job per module, re-exports (its imports are
checked with every other module's by tests/test_architecture.py)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nolabels.methods.coder as C

PKG = Path(C.__file__).resolve().parent
MODULES = ("templates", "knowledge", "text_bank", "zero_shot", "few_shot", "generate")


def test_the_package_has_one_module_per_job_each_with_a_docstring():
    assert C.__file__.endswith("__init__.py")
    found = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    assert found == set(MODULES)
    for name in MODULES:
        doc = ast.get_docstring(ast.parse((PKG / f"{name}.py").read_text(encoding="utf-8")))
        assert doc and "CVPR24-CODER" in doc, f"{name}.py: no docstring citing the authors' code"


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (def, class, assignment)."""
    out = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out


def test_each_name_is_defined_once_and_reexported_as_the_same_object():
    import importlib

    owners: dict[str, list[str]] = {}
    for name in MODULES:
        for attr in _top_level_names(PKG / f"{name}.py"):
            owners.setdefault(attr, []).append(name)
    twice = {a: m for a, m in owners.items() if len(m) > 1}
    assert twice == {}
    assert len(C.__all__) == len(set(C.__all__))
    for attr in C.__all__:
        assert attr in owners, f"{attr} is defined in no coder module"
        mod = importlib.import_module(f"nolabels.methods.coder.{owners[attr][0]}")
        assert getattr(C, attr) is getattr(mod, attr), f"C.{attr} is not {mod.__name__}.{attr}"


def test_importing_presets_first_has_no_cycle():
    """presets imports coder.templates at module level and templates imports presets lazily:
    either import order works in a fresh interpreter."""
    code = ("import nolabels.methods.presets as p; from nolabels.methods import coder as C; "
            "assert p.lookup('dtd') is not None and C.default_tau('dtd') == 0.6")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
