"""`xctsam ui` (a root command): the MLflow UI."""

from __future__ import annotations

from typing import Annotated

import typer

from xctsam.cli.common import app


@app.command("ui")
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Start the MLflow UI on the project's store (127.0.0.1, lean settings); Ctrl-C stops it."""
    from xctsam.ui import serve

    raise typer.Exit(serve(port))
