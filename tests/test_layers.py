"""The package's layers import one way, bottom to top, and no modules import each other.

Read from the source with `ast` (imports inside functions and under TYPE_CHECKING count: a
deferred import is still a dependency), so a new upward import fails here, not in review.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src"

# Bottom to top. A module may import its own package, any lower layer, and the utilities; never
# a higher layer, nor a peer package of its own layer (sim, models and gan stay independent).
LAYERS: list[set[str]] = [
    {"xctsam", "util"},
    {"config"},
    {"params_file"},  # edits params.yaml in place, validating through config
    {"data"},
    {"sim", "models", "gan"},
    {"eval"},
    {"train"},
    {"pretrain", "tune", "report", "ui"},
    {"cli"},
]
RANK = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: its package under xctsam, or the top-level module itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "xctsam"


def imported_modules(path: Path, module: str, known: set[str]) -> Iterator[tuple[str, int]]:
    """(xctsam module, line) for every import in the file, resolved to the longest known module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name, node.lineno


def import_graph(src: Path) -> dict[str, dict[str, int]]:
    files = {module_name(path, src): path for path in (src / "xctsam").rglob("*.py")}
    known = set(files)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        graph[module] = {}
        for target, line in imported_modules(path, module, known):
            # `from xctsam.data import volumes` names the package too: keep the module itself
            if target in ("xctsam", f"xctsam.{unit(target)}") and any(t.startswith(target + ".") for t in graph[module]):
                continue
            graph[module].setdefault(target, line)
    return graph


def layer_violations(src: Path) -> list[str]:
    problems = []
    for module, targets in sorted(import_graph(src).items()):
        here = unit(module)
        for target, line in targets.items():
            there = unit(target)
            if there == here or target == "xctsam":
                continue
            if RANK[there] > RANK[here]:
                problems.append(f"{module}:{line} imports {target}: upward ({here} is below {there})")
            elif RANK[there] == RANK[here] and RANK[here] > 0:
                problems.append(f"{module}:{line} imports {target}: peers of one layer stay independent")
    return problems


def import_cycles(src: Path) -> list[list[str]]:
    """Every cycle of modules that import each other (one per strongly connected component)."""
    graph = {module: set(targets) - {"xctsam"} for module, targets in import_graph(src).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_every_package_has_a_layer() -> None:
    units = {unit(module) for module in import_graph(SRC)}
    assert units <= set(RANK), f"give these a layer in LAYERS: {sorted(units - set(RANK))}"


def test_layers_import_one_way() -> None:
    assert layer_violations(SRC) == []


def test_no_modules_import_each_other() -> None:
    assert import_cycles(SRC) == []


def test_the_checks_see_upward_and_circular_imports(tmp_path: Path) -> None:
    """The walker finds a deferred upward import and a cycle in a made-up package."""
    package = tmp_path / "xctsam"
    for folder in ("models", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "models" / "base.py").write_text("def f():\n    from xctsam.train.losses import g\n")
    (package / "train" / "losses.py").write_text("from xctsam.models import base\n")
    assert layer_violations(tmp_path) == ["xctsam.models.base:2 imports xctsam.train.losses: upward (models is below train)"]
    assert import_cycles(tmp_path) == [["xctsam.models.base", "xctsam.train.losses"]]


def test_the_cli_package_is_the_top_layer() -> None:
    """Every module of the cli package (root, common, one per noun) belongs to the cli layer."""
    cli_modules = {module for module in import_graph(SRC) if module == "xctsam.cli" or module.startswith("xctsam.cli.")}
    assert {"xctsam.cli", "xctsam.cli.root", "xctsam.cli.common", "xctsam.cli.train"} <= cli_modules
    assert {unit(module) for module in cli_modules} == {"cli"}
    assert RANK["cli"] == len(LAYERS) - 1
