"""The layout rules of DESIGN.md section 1, checked by walking every module's imports.

- a ``.py`` at the top of ``stages/`` is a registered stage and nothing else, and every
  registered stage lives in one;
- libraries (``stages/<pkg>/``) never import a stage module, the runner or the CLI;
- pure math imports torch, the standard library and other pure modules only (its settings
  arrive as arguments; the config class lives with the stage that owns it);
- no library package or module is named like a stage;
- only ``cluster/`` and the runner import ``ray``;
- no module is over :data:`MAX_LINES` lines.

Imports are read with :mod:`ast` (function-level imports included), so nothing is imported
to check the import rules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: top-level package folder -> its dotted name
PACKAGES = {"stages": "recoup.stages", "orchestrator": "recoup.orchestrator",
            "cluster": "recoup.cluster"}
MAX_LINES = 450
#: pure math: torch, the standard library and the modules listed here, nothing else
PURE = frozenset({
    "recoup.stages.compress.pruning",
    "recoup.stages.lcc.compensation",
    "recoup.stages.lcc.directions",
    "recoup.stages.lcc.heads",
    "recoup.stages.lcc.probe",
    "recoup.stages.model.layout",
    "recoup.stages.model.lm_metrics",
    "recoup.stages.model.tokenize",
    "recoup.stages.recovery.losses",
})
PURE_THIRD_PARTY = frozenset({"torch"})
#: the modules allowed to import ray (besides everything under cluster/)
RAY_IMPORTERS = frozenset({"recoup.orchestrator.runner"})
#: what a library must never import
FORBIDDEN_FOR_LIBRARIES = frozenset({"recoup.orchestrator.runner", "recoup.orchestrator.cli"})


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[parts[0]], *parts[1:]])


def _modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[_module_name(path)] = path
    return out


MODULES = _modules()
STAGE_MODULES = {name: path for name, path in MODULES.items()
                 if path.parent == ROOT / "stages" and path.name != "__init__.py"}
STAGE_NAMES = frozenset(path.stem for path in STAGE_MODULES.values())
LIBRARIES = {name: path for name, path in MODULES.items()
             if path.parent != ROOT / "stages" and path.is_relative_to(ROOT / "stages")}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imports_of(module: str, path: Path) -> Iterator[str]:
    """Every module ``module`` imports, dotted; ``from a import b`` yields ``a`` and
    ``a.b`` (``b`` may be a submodule), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            for alias in node.names:
                yield f"{target}.{alias.name}"


def _registers_a_stage(path: Path) -> bool:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else getattr(fn, "attr", None)
            if name == "register_stage":
                return True
    return False


def _is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def test_the_walk_finds_the_layout() -> None:
    assert {"recoup.stages.data", "recoup.stages.select"} <= set(STAGE_MODULES)
    assert "recoup.stages.lcc.heads" in LIBRARIES
    missing = sorted(PURE - set(MODULES))
    assert not missing, f"listed as pure but not found: {missing}"


def test_every_top_level_stage_module_registers_a_stage() -> None:
    bare = sorted(name for name, path in STAGE_MODULES.items() if not _registers_a_stage(path))
    assert not bare, f"top-level stages/ modules that register no stage: {bare}"


def test_stages_are_registered_only_in_top_level_stage_modules() -> None:
    elsewhere = sorted(name for name, path in MODULES.items()
                       if name not in STAGE_MODULES and _registers_a_stage(path)
                       and name != "recoup.orchestrator.stage")
    assert not elsewhere, f"modules outside the top of stages/ that register a stage: {elsewhere}"


def test_every_registered_stage_function_lives_in_a_top_level_stage_module() -> None:
    import importlib

    from recoup.orchestrator.stage import registered_stages

    for name in STAGE_MODULES:
        importlib.import_module(name)
    wrong = {spec.name: spec.fn.__module__ for spec in registered_stages().values()
             if spec.fn.__module__ not in STAGE_MODULES}
    assert not wrong, f"stages registered outside a top-level stage module: {wrong}"


def test_libraries_never_import_a_stage_the_runner_or_the_cli() -> None:
    bad = {}
    for name, path in LIBRARIES.items():
        hits = sorted({i for i in imports_of(name, path)
                       if i in STAGE_MODULES or i in FORBIDDEN_FOR_LIBRARIES})
        if hits:
            bad[name] = hits
    assert not bad, f"libraries importing a stage module, the runner or the CLI: {bad}"


def test_pure_math_imports_torch_and_the_standard_library_only() -> None:
    bad = {}
    for name in sorted(PURE):
        hits = sorted({i for i in imports_of(name, MODULES[name])
                       if not (_is_stdlib(i) or i.split(".")[0] in PURE_THIRD_PARTY
                               or i in PURE or i.rpartition(".")[0] in PURE
                               or i == "__future__" or i.startswith("__future__."))})
        if hits:
            bad[name] = hits
    assert not bad, f"pure math modules with other imports: {bad}"


def test_no_library_package_or_module_shadows_a_stage_name() -> None:
    shadows = sorted(name for name, path in LIBRARIES.items()
                     if (path.stem if path.name != "__init__.py" else path.parent.name)
                     in STAGE_NAMES)
    assert not shadows, f"library modules named like a stage ({sorted(STAGE_NAMES)}): {shadows}"


def test_only_the_cluster_and_the_runner_import_ray() -> None:
    bad = sorted(name for name, path in MODULES.items()
                 if not name.startswith("recoup.cluster") and name not in RAY_IMPORTERS
                 and any(i == "ray" or i.startswith("ray.") for i in imports_of(name, path)))
    assert not bad, f"modules outside cluster/ and the runner that import ray: {bad}"


@pytest.mark.parametrize("top", sorted(PACKAGES))
def test_no_module_is_over_the_line_limit(top: str) -> None:
    long = {name: n for name, path in MODULES.items()
            if path.is_relative_to(ROOT / top)
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
