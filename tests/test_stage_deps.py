"""Every module a DVC stage's command runs is among that stage's deps in dvc.yaml.

A stage whose code is not a dependency keeps stale outputs without a word when that code
changes. So the code a stage runs is derived here from the source: the CLI function its `cmd`
names, the modules that function (and the CLI helpers it calls) imports, and everything those
import in turn, inside functions included. cli.py itself is left out: it only parses arguments,
and every stage passes its own.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest

from .conftest import REPO
from .test_layers import import_graph, module_name

SRC = REPO / "src"
CLI = SRC / "xctsam" / "cli.py"


def _typer_groups(tree: ast.Module) -> dict[str, str]:
    """{variable of a sub-app: its command-line name} from `app.add_typer(data_app, name="data")`."""
    groups = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer":
            name = next(kw.value.value for kw in node.keywords if kw.arg == "name")
            groups[node.args[0].id] = name
    return groups


def cli_commands(cli: Path = CLI) -> dict[tuple[str, ...], ast.FunctionDef]:
    """{("data", "simulate"): its function} for every command of the Typer app."""
    tree = ast.parse(cli.read_text())
    groups = _typer_groups(tree)
    commands = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) and decorator.func.attr == "command":
                owner = decorator.func.value.id
                words = (groups[owner],) if owner in groups else ()
                commands[(*words, decorator.args[0].value)] = node
    return commands


def _function_imports(function: ast.FunctionDef, helpers: dict[str, ast.FunctionDef], seen: set[str]) -> set[str]:
    """Modules `function` imports, and those of the cli.py helpers it calls, transitively."""
    modules = set()
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xctsam"):
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in helpers and node.func.id not in seen:
            seen.add(node.func.id)
            modules |= _function_imports(helpers[node.func.id], helpers, seen)
    return modules


def modules_run_by(words: tuple[str, ...], src: Path = SRC) -> set[str]:
    """Every xctsam module the command `xctsam <words>` runs, closed over imports."""
    graph = import_graph(src)
    cli = src / "xctsam" / "cli.py"
    helpers = {node.name: node for node in ast.parse(cli.read_text()).body if isinstance(node, ast.FunctionDef)}
    function = cli_commands(cli)[words]
    pending = {name for name in _function_imports(function, helpers, set()) if name in graph}
    closed: set[str] = set()
    while pending:
        module = pending.pop()
        closed.add(module)
        # importing xctsam.sim.physics runs xctsam/__init__.py and xctsam/sim/__init__.py first
        parents = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)}
        pending |= (set(graph[module]) | parents) - closed
    closed.discard("xctsam.cli")
    return closed


def module_file(module: str, src: Path = SRC) -> Path:
    path = src.joinpath(*module.split("."))
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(src.parent)


def uncovered(module_files: set[Path], deps: list[str]) -> list[str]:
    """The files no dep names, itself or through a folder holding it."""
    dep_paths = [Path(dep) for dep in deps]
    return sorted(str(f) for f in module_files if not any(f == dep or dep in f.parents for dep in dep_paths))


@pytest.fixture(scope="module")
def stages() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """{stage: (command words after `xctsam`, its deps as repo-relative paths)} of dvc.yaml."""
    from dvc.repo import Repo

    commands = cli_commands()
    found = {}
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            argv = shlex.split(stage.cmd)
            assert argv[0] == "xctsam", f"{stage.addressing}: dvc.yaml calls only the CLI"
            words = next(tuple(argv[1:n]) for n in (3, 2) if tuple(argv[1:n]) in commands)
            deps = [str(Path(dep.fs_path).relative_to(REPO)) for dep in stage.deps if not hasattr(dep, "params")]
            found[stage.addressing] = (words, deps)
    return found


def test_every_stage_depends_on_the_code_it_runs(stages: dict[str, tuple[tuple[str, ...], list[str]]]) -> None:
    missing = {}
    for name, (words, deps) in stages.items():
        files = {module_file(module) for module in modules_run_by(words)}
        if gaps := uncovered(files, deps):
            missing[name] = gaps
    assert missing == {}, "add these to the stages' deps in dvc.yaml (a package folder covers its files)"


def test_the_derivation_follows_imports_inside_functions() -> None:
    """`data simulate` reaches the projector only through sim.physics; `train pretrain` reaches
    the SAM builder and the training loop only through its imports' imports."""
    assert {"xctsam.sim.projector", "xctsam.sim.splits", "xctsam.sim.physics"} <= modules_run_by(("data", "simulate"))
    assert {"xctsam.models.sam_builder", "xctsam.train.loop"} <= modules_run_by(("train", "pretrain"))


def test_a_missing_module_is_reported() -> None:
    files = {Path("src/xctsam/sim/projector.py"), Path("src/xctsam/sim/physics.py")}
    assert uncovered(files, ["src/xctsam/sim/physics.py"]) == ["src/xctsam/sim/projector.py"]
    assert uncovered(files, ["src/xctsam/sim"]) == []
    assert module_name(SRC / "xctsam" / "sim" / "physics.py", SRC) == "xctsam.sim.physics"
