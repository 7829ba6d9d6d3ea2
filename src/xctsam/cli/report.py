"""`xctsam report` (a root command): the study report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import ParamsOption, app


@app.command("report")
def report(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for study.md, study.html and overlays.")] = Path("reports"),
    root: Annotated[Path | None, typer.Option("--root", help="Data root for the overlays (default: params study.root).")] = None,
) -> None:
    """reports/study.md and a self-contained study.html: FID, IoU, forgetting, robustness, overlays."""
    from xctsam.config.params import load_params
    from xctsam.eval.label_cache import LabelCache
    from xctsam.report.stage import write_report

    for path in write_report(load_params(params), Path("."), out, data_root=root, cache=LabelCache.default()):
        print(path)
