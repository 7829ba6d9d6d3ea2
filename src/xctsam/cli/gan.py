"""`xctsam gan`: train the CycleGAN and synthesize experimental-looking volumes with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import DataRootOption, FreshOption, ParamsOption, SeedOption, _with_seed

gan_app = typer.Typer(help="CycleGAN: idealised render -> experimental-looking XCT.", no_args_is_help=True)


@gan_app.command("train")
def gan_train(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, the final generator and samples.")] = Path("models/gan"),
    seed: SeedOption = None,
    fresh: FreshOption = False,
) -> None:
    """Train the CycleGAN on tiles of gan.domain_a and gan.domain_b; resumes from its last checkpoint."""
    from xctsam.config.params import load_params
    from xctsam.gan.train import train_gan

    config = _with_seed(load_params(params), seed)
    result = train_gan(config, root, out, resume=not fresh)
    print(result)


@gan_app.command("synthesize")
def gan_synthesize(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    generator: Annotated[Path, typer.Option(help="Generator written by `xctsam gan train`.")] = Path("models/gan/generator_a2b.pt"),
) -> None:
    """Translate every labelled gan.domain_a volume into gan.output (labels unchanged)."""
    from xctsam.config.params import load_params
    from xctsam.gan.synthesize import synthesize

    for path in synthesize(load_params(params), root, generator):
        print(path)
