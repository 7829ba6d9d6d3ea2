"""The `xctsam` command line: one Typer app with a sub-app per noun (see root.py)."""

from xctsam.cli.root import app, main

__all__ = ["app", "main"]
