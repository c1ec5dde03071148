"""The package's structure holds: layers import only downwards, no module reaches into another's
private names, and the README's layout names every module."""

from __future__ import annotations

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bita_jax"

# A component may import its own modules and components of a lower rank, nothing else.
RANK = {"models": 0, "cli": 0, "distributed": 0, "sharding": 1, "checkpoints": 1, "decoding": 2,
        "data": 3, "training": 4, "eval": 5, "api": 6}


def _component(module: str) -> str | None:
    """'bita_jax.decoding.engine' -> 'decoding'; None for the package root itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the file, function-level ones too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names)
    return out


def _sources(*folders: str) -> list[pathlib.Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def _bita_modules() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")}


def test_every_component_is_ranked():
    found = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert found - {"__init__"} == set(RANK)


def test_layers_import_only_downwards():
    bad = []
    for path in _sources("bita_jax"):
        me = _component(_module_name(path))
        if me is None:
            continue  # bita_jax/__init__.py re-exports the api lazily
        for module, names, line in _imports(ast.parse(path.read_text())):
            if not module.startswith("bita_jax"):
                continue
            targets = [_component(module)] if _component(module) else [
                n for n in names if n in RANK]  # `from bita_jax import models, sharding`
            for target in targets:
                if target != me and RANK[target] >= RANK[me]:
                    bad.append(f"{path.relative_to(REPO)}:{line} ({me}) imports {target}")
    assert not bad, "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    modules = _bita_modules()
    bad = []
    for path in _sources("bita_jax", "infer", "train", "tests"):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> bita_jax module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "bita_jax"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in modules:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_"):
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports "
                                   f"{node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("bita_jax") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} uses "
                           f"{aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n.*?```\n(.*?)```", readme, re.S).group(1)
    missing = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py":
            continue
        if not re.search(rf"(?<![\w.]){re.escape(path.name)}", block):
            missing.append(str(path.relative_to(REPO)))
    for folder in [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]:
        if f"{folder.name}/" not in block:
            missing.append(f"{folder.relative_to(REPO)}/")
    assert not missing, missing
