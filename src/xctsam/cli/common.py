"""What the command modules share: the root Typer app, the option types, `_with_seed`.

The root app is made here, below every command module, so that root-level commands (predict,
report, ui) can register on it without importing root.py, which imports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="xctsam: SAM with Conv-LoRA for industrial XCT segmentation.", no_args_is_help=True, pretty_exceptions_enable=False)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SeedOption = Annotated[int | None, typer.Option(help="Override params `seed`.")]
DataRootOption = Annotated[Path, typer.Option("--root", help="Data root holding real/ and synthetic/.")]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint and start over.")]
ModelOutOption = Annotated[Path | None, typer.Option("--out", help="Model folder (default models/<model>).")]
SplitsOption = Annotated[list[str] | None, typer.Option("--split", "-s", help="Only this split (repeatable); default all.")]


def _with_seed(config, seed: int | None):
    return config if seed is None else config.model_copy(update={"seed": seed})
