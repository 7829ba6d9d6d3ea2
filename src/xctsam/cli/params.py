"""`xctsam params`: change params.yaml from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import ParamsOption

params_app = typer.Typer(help="Change params.yaml from the command line (comments and layout kept).", no_args_is_help=True)


@params_app.command("apply")
def params_apply(
    overlay: Annotated[Path, typer.Argument(help="YAML of dotted keys and their new values, e.g. configs/real-samgan.yaml.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Set every key the overlay lists in params.yaml; the result is validated before it is written."""
    from xctsam.params_file import apply_overlay

    def short(value: object) -> str:  # a whole section would flood the terminal
        text = str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    for key, (before, after) in apply_overlay(params, overlay).items():
        print(f"{key}: {short(before)} -> {short(after)}")
