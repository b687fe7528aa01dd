"""The floors of ARCHITECTURE.md hold: each module imports only from its own floor or the
floors below it, and every path the page names exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "python" / "nolabels"

# floor of a module (its first path part under nolabels/, or its file stem)
FLOOR = {
    "errors": "base", "progress": "base", "assets": "base", "dist": "base", "_lib": "base", "llm": "base",
    "triton": "kernels", "reference": "kernels", "backends": "kernels", "launch_plans": "kernels",
    "ops": "ops", "data": "data", "models": "models", "methods": "methods",
    "pipeline": "pipeline", "api": "api", "info": "info",
    "cli": "cli", "commands": "cli", "__main__": "cli", "__init__": "package",
}
_BELOW = {
    "base": {"base"},
    "kernels": {"base", "kernels"},
    "ops": {"base", "kernels", "ops"},
    "data": {"base", "kernels", "ops", "data"},
    "models": {"base", "kernels", "ops", "data", "models"},
    "methods": {"base", "kernels", "ops", "data", "models", "methods"},
    "pipeline": {"base", "kernels", "ops", "data", "models", "methods", "pipeline"},
    "api": {"base", "data", "pipeline", "api"},
    "info": {"base", "kernels", "ops", "info"},
    "package": {"base", "kernels", "ops", "info"},  # nolabels/__init__.py
    "cli": set(FLOOR.values()) - {"package"},
}


def _floor_of_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "nolabels":
        return None
    if len(parts) == 1:
        return None  # "from nolabels import x": x decides
    return FLOOR.get(parts[1])


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    here = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def _violations() -> list[str]:
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        key = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        floor = FLOOR.get(key)
        assert floor is not None, f"{rel}: not on any floor (add it to ARCHITECTURE.md and FLOOR)"
        for mod in _imports(f):
            target = _floor_of_module(mod)
            if target is not None and target not in _BELOW[floor]:
                bad.append(f"{rel} ({floor}) imports {mod} ({target})")
    return sorted(set(bad))


def test_every_module_imports_only_its_floor_and_below():
    assert _violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """An ops module importing the pipeline is reported (the check can fail)."""
    fake = PKG / "ops" / "_architecture_probe_tmp.py"
    fake.write_text("from nolabels.pipeline import label\n")
    try:
        assert any("_architecture_probe_tmp" in v for v in _violations())
    finally:
        fake.unlink()


def test_paths_named_in_architecture_md_exist():
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:python|csrc|kernels|tests|benchmarks)/[^`\s]+|CMakeLists\.txt)`",
                           text))
    assert len(named) > 20
    missing = [p for p in sorted(named)
               if "<" not in p and not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists())]
    assert missing == []
