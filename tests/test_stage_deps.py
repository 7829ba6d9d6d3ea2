"""Every module a DVC stage's command runs is among that stage's deps in dvc.yaml.

A stage whose code is not a dependency keeps stale outputs without a word when that code
changes. So the code a stage runs is derived here from the source: the CLI function its `cmd`
names (in whichever module of the cli package registers it), the modules that function (and the
CLI helpers it calls, in its own module or imported from another cli module) imports, and
everything those import in turn, inside functions included. The cli package itself is left out:
it only parses arguments, and every stage passes its own.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest

from .conftest import REPO
from .test_layers import import_graph, module_name

SRC = REPO / "src"
CLI = SRC / "xctsam" / "cli"

Ref = tuple[str, str]  # (module of the cli package, a top-level name in it)


class CliSource:
    """The modules of the cli package, parsed: their top-level functions and what names they
    import from one another."""

    def __init__(self, cli: Path = CLI) -> None:
        src = cli.parent.parent
        self.trees: dict[str, ast.Module] = {}
        self.imports: dict[str, dict[str, Ref]] = {}
        for path in sorted(cli.rglob("*.py")):
            module = module_name(path, src)
            self.trees[module] = tree = ast.parse(path.read_text(), str(path))
            self.imports[module] = _imported_names(module, tree, path.name == "__init__.py")
        self.functions: dict[Ref, ast.FunctionDef] = {
            (module, node.name): node for module, tree in self.trees.items() for node in tree.body if isinstance(node, ast.FunctionDef)
        }

    def resolve(self, module: str, name: str) -> Ref:
        """Where `name`, as used in `module`, is defined: follows `from xctsam.cli.x import name`."""
        seen = set()
        while (module, name) not in seen:
            seen.add((module, name))
            source = self.imports[module].get(name)
            if source is None or source[0] not in self.trees:
                break
            module, name = source
        return module, name


def _imported_names(module: str, tree: ast.Module, is_package: bool) -> dict[str, Ref]:
    """{local name: (module, name there)} of a module's top-level `from ... import` statements."""
    names = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                base = ".".join([*parts[: len(parts) - node.level + (1 if is_package else 0)], *([base] if base else [])])
            for alias in node.names:
                names[alias.asname or alias.name] = (base, alias.name)
    return names


def _typer_groups(cli: CliSource) -> dict[Ref, tuple[Ref, str]]:
    """{a sub-app: (the app it is added to, its command-line name)} from every
    `app.add_typer(data_app, name="data")` in the cli package."""
    groups = {}
    for module, tree in cli.trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_typer":
                name = next((kw.value.value for kw in node.keywords if kw.arg == "name"), None)
                assert name is not None, f"{module}:{node.lineno}: give add_typer a name= (this test reads it)"
                groups[cli.resolve(module, node.args[0].id)] = (cli.resolve(module, node.func.value.id), name)
    return groups


def cli_commands(cli: Path = CLI) -> dict[tuple[str, ...], tuple[str, ast.FunctionDef]]:
    """{("data", "simulate"): (its module, its function)} for every command of the Typer app,
    registered by `@<app>.command("name")` in any module of the cli package."""
    source = CliSource(cli)
    groups = _typer_groups(source)
    commands = {}
    for (module, _), node in source.functions.items():
        for decorator in node.decorator_list:
            if isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute) and decorator.func.attr == "command":
                owner = source.resolve(module, decorator.func.value.id)
                words: tuple[str, ...] = ()
                while owner in groups:
                    owner, name = groups[owner]
                    words = (name, *words)
                words = (*words, decorator.args[0].value)
                assert words not in commands, f"`xctsam {' '.join(words)}` is registered twice"
                commands[words] = (module, node)
    return commands


def _function_imports(module: str, function: ast.FunctionDef, cli: CliSource, seen: set[Ref]) -> set[str]:
    """Modules `function` (defined in `module`) imports, and those of the cli helpers it calls,
    transitively, wherever in the cli package they are defined."""
    modules = set()
    for node in ast.walk(function):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xctsam"):
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            helper = cli.resolve(module, node.func.id)
            if helper in cli.functions and helper not in seen:
                seen.add(helper)
                modules |= _function_imports(helper[0], cli.functions[helper], cli, seen)
    return modules


def _is_cli(module: str) -> bool:
    return module == "xctsam.cli" or module.startswith("xctsam.cli.")


def modules_run_by(words: tuple[str, ...], src: Path = SRC) -> set[str]:
    """Every xctsam module the command `xctsam <words>` runs, closed over imports."""
    graph = import_graph(src)
    cli = src / "xctsam" / "cli"
    module, function = cli_commands(cli)[words]
    # a cli module is neither counted nor followed: its commands' imports are their own
    pending = {name for name in _function_imports(module, function, CliSource(cli), set()) if name in graph and not _is_cli(name)}
    closed: set[str] = set()
    while pending:
        module = pending.pop()
        closed.add(module)
        # importing xctsam.sim.physics runs xctsam/__init__.py and xctsam/sim/__init__.py first
        parents = {module.rsplit(".", depth)[0] for depth in range(1, module.count(".") + 1)}
        pending |= {name for name in set(graph[module]) | parents if not _is_cli(name)} - closed
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
    the SAM builder and the trainer's learning-rate schedule only through its imports' imports."""
    assert {"xctsam.sim.projector", "xctsam.sim.splits", "xctsam.sim.physics"} <= modules_run_by(("data", "simulate"))
    assert {"xctsam.models.sam_builder", "xctsam.train.trainer"} <= modules_run_by(("train", "pretrain"))


def test_a_missing_module_is_reported() -> None:
    files = {Path("src/xctsam/sim/projector.py"), Path("src/xctsam/sim/physics.py")}
    assert uncovered(files, ["src/xctsam/sim/physics.py"]) == ["src/xctsam/sim/projector.py"]
    assert uncovered(files, ["src/xctsam/sim"]) == []
    assert module_name(SRC / "xctsam" / "sim" / "physics.py", SRC) == "xctsam.sim.physics"


def test_the_walker_finds_every_command_of_the_app() -> None:
    """The commands read from the source of the cli package's modules are those the app has."""
    import typer

    from xctsam.cli import app

    def walk(group: object, words: tuple[str, ...]) -> set[tuple[str, ...]]:
        found = set()
        for name, command in group.commands.items():  # a group (Click's, or the one typer ships) has .commands
            found |= walk(command, (*words, name)) if hasattr(command, "commands") else {(*words, name)}
        return found

    assert set(cli_commands()) == walk(typer.main.get_command(app), ())
    assert cli_commands()[("train", "sam")][0] == "xctsam.cli.train"
    assert cli_commands()[("predict",)][0] == "xctsam.cli.eval"  # a root command outside root.py


def test_helpers_are_followed_across_cli_modules(tmp_path: Path) -> None:
    """A command calling a helper imported from another cli module runs that helper's imports
    (and theirs); the cli modules themselves are left out, and deps naming only the command's
    own imports miss the rest."""
    package = tmp_path / "src" / "xctsam"
    files = {
        "__init__.py": "",
        "lib/__init__.py": "",
        "lib/a.py": "from xctsam.lib import b\n",
        "lib/b.py": "",
        "lib/c.py": "",
        "cli/__init__.py": "from xctsam.cli.root import app\n",
        "cli/common.py": "import typer\napp = typer.Typer()\n\ndef _helper():\n    from xctsam.lib.a import thing\n    from xctsam.cli.shown import show\n",
        "cli/shown.py": "def show():\n    pass\n",
        "cli/things.py": (
            "import typer\nfrom xctsam.cli.common import _helper, app\nthings_app = typer.Typer()\n\n"
            "@things_app.command('go')\ndef go():\n    _helper()\n\n"
            "@app.command('top')\ndef top():\n    from xctsam.lib.c import other\n"
        ),
        "cli/root.py": "from xctsam.cli.common import app\nfrom xctsam.cli.things import things_app\napp.add_typer(things_app, name='things')\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    src = tmp_path / "src"
    assert set(cli_commands(package / "cli")) == {("things", "go"), ("top",)}
    assert modules_run_by(("things", "go"), src) == {"xctsam", "xctsam.lib", "xctsam.lib.a", "xctsam.lib.b"}
    assert modules_run_by(("top",), src) == {"xctsam", "xctsam.lib", "xctsam.lib.c"}
    files = {module_file(module, src) for module in modules_run_by(("things", "go"), src)}
    assert uncovered(files, ["src/xctsam/__init__.py", "src/xctsam/lib/__init__.py", "src/xctsam/lib/a.py"]) == ["src/xctsam/lib/b.py"]


def test_a_stage_reaches_the_code_of_a_helper_in_its_cli_module() -> None:
    """`train sam` imports nothing itself: the training stage comes through `_train` (cli/train.py)."""
    assert "xctsam.train.stage" in modules_run_by(("train", "sam"))
    assert not any(_is_cli(module) for module in modules_run_by(("train", "sam")))


# The tuner rewrites whole params (its search space names dotted keys of any section), so it
# sees them all; so does params_file, which edits params.yaml.
WHOLE_PARAMS_READERS = ("xctsam.tune", "xctsam.params_file")


def test_only_stage_modules_see_the_whole_params() -> None:
    """A library takes its own section; only the modules a CLI command calls into (the stages)
    import the whole Params, so a section's code cannot come to depend on another's."""
    graph = import_graph(SRC)
    source = CliSource(CLI)
    called = set()
    for module, function in cli_commands(CLI).values():
        called |= _function_imports(module, function, source, set())
    readers = {module for module, imported in graph.items() if "xctsam.config.params" in imported}
    libraries = {
        module for module in readers - called
        if not _is_cli(module) and not module.startswith("xctsam.config") and not module.startswith(WHOLE_PARAMS_READERS)
    }
    assert not libraries, f"library modules take the whole Params (pass them their section): {sorted(libraries)}"
