"""The `xctsam` command line: one Typer app with a sub-app per noun.

Errors a user can fix (XctsamError) print one line to stderr and exit with code 2; `--debug`
shows the traceback instead.

This module assembles the app: the sub-apps of the nouns (data, train, gan, eval, params, tune)
are added here; predict (in eval.py), report and ui are commands of the root app itself and
register on it when their modules are imported, in import order, which is the order
`xctsam --help` lists them.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from xctsam.cli.common import app
from xctsam.cli.data import data_app
from xctsam.cli.eval import eval_app
from xctsam.cli.gan import gan_app
from xctsam.cli.params import params_app
from xctsam.cli.report import report  # noqa: F401  (registers `xctsam report`)
from xctsam.cli.train import train_app
from xctsam.cli.tune import tune_app
from xctsam.cli.ui import ui  # noqa: F401  (registers `xctsam ui`)
from xctsam.util.errors import XctsamError
from xctsam.util.interrupt import Interrupted, signals_raise
from xctsam.util.threads import size_pool_before_import

app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(gan_app, name="gan")
app.add_typer(eval_app, name="eval")
app.add_typer(params_app, name="params")
app.add_typer(tune_app, name="tune")

_state = {"debug": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def _show_progress_messages() -> None:
    """The library's info lines ("resuming from step N ...") reach the user on stderr, above
    any live progress bar (one console for both)."""
    from rich.logging import RichHandler

    from xctsam.util.progress import console

    logger = logging.getLogger("xctsam")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False, show_level=False, markup=False))
        logger.setLevel(logging.INFO)


def _exit_code(code: object) -> int:
    """SystemExit's code as the process exit status (None: 0; a message: printed, 1)."""
    if code is None or isinstance(code, int):
        return int(code or 0)
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (also used by tests).

    Typer runs in standalone mode: usage errors (unknown command or option, missing argument,
    invalid value) print its own short usage message and exit 2, whatever Click it ships. A
    user error (XctsamError) is one line and code 2; a stop signal is one line and 128 + its
    number (130 Ctrl-C, 143 SIGTERM); `raise typer.Exit(n)` in a command exits n.
    """
    _show_progress_messages()
    try:
        size_pool_before_import()  # before anything imports torch: one thread per core given
        with signals_raise():
            app(args=argv, prog_name="xctsam", standalone_mode=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except XctsamError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a Ctrl-C that arrived before our handler was in place
        print(Interrupted().message, file=sys.stderr)
        return 130
    return 0
