"""`xctsam data`: make, import and inspect XCT volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from xctsam.cli.common import ParamsOption, SeedOption, SplitsOption

data_app = typer.Typer(help="Make, import and inspect XCT volumes.", no_args_is_help=True)

_err = Console(stderr=True)


@data_app.command("phantoms")
def data_phantoms(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for the label volumes, one subfolder per split.")] = Path("data/phantoms"),
    seed: SeedOption = None,
    split: SplitsOption = None,
) -> None:
    """Generate the 3-D label phantoms (coupons with pores and inclusions) of every split."""
    from xctsam.config.params import load_params
    from xctsam.sim.splits import make_phantoms

    config = load_params(params)
    for path in make_phantoms(config.data, config.seed if seed is None else seed, out, splits=split):
        print(path)


@data_app.command("simulate")
def data_simulate(
    params: ParamsOption = Path("params.yaml"),
    phantoms: Annotated[Path, typer.Option(help="Folder written by `xctsam data phantoms`.")] = Path("data/phantoms"),
    root: Annotated[Path, typer.Option(help="Data root: writes real/<split> and synthetic/<split>.")] = Path("data"),
    seed: SeedOption = None,
    split: SplitsOption = None,
) -> None:
    """Render each split: idealised (synthetic, domain A) or physics XCT at its scanner setting (real)."""
    from xctsam.config.params import load_params
    from xctsam.sim.splits import simulate_splits

    config = load_params(params)
    for path in simulate_splits(config.data, config.seed if seed is None else seed, phantoms, root, splits=split):
        print(path)


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="A SAM-Material-GAN folder, TIFF folder, multi-page TIFF, HDF5 or NPY file.")],
    format: Annotated[str, typer.Option("--format", "-f", help="samgan | tiff-dir | tiff | hdf5 | npy")] = "samgan",
    root: Annotated[Path, typer.Option(help="Data root: samgan writes synthetic/Tr-GAN and real/Te-N here.")] = Path("data"),
    split: Annotated[str | None, typer.Option(help="Split folder for a single volume, e.g. real/Te-1 (not samgan).")] = None,
    name: Annotated[str | None, typer.Option(help="Volume name (default: the source's stem).")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels for a single volume, in the same format (values 0..3).")] = None,
    dataset: Annotated[str, typer.Option(help="HDF5 dataset path of the image.")] = "image",
    label_dataset: Annotated[str, typer.Option(help="HDF5 dataset path of the labels.")] = "labels",
    voxel_size_mm: Annotated[float | None, typer.Option(help="Voxel size to record, mm.")] = None,
) -> None:
    """Import real scans into the volume store (one HDF5 per scan, a manifest per split)."""
    from xctsam.data import importers, samgan

    if format == "samgan":
        written = samgan.import_samgan(source, root)
    else:
        if split is None:
            raise typer.BadParameter("give --split (e.g. real/Te-1) for a single-volume import", param_hint="--split")
        if voxel_size_mm is not None:  # recorded with the volume, used for sizes in mm later
            from xctsam.config.base import voxel_size_problem

            if problem := voxel_size_problem(voxel_size_mm):
                raise typer.BadParameter(problem, param_hint="--voxel-size-mm")
        written = [
            importers.import_volume(
                source, format, importers.split_folder(root, split), name=name, labels=labels, dataset=dataset,
                label_dataset=label_dataset, voxel_size_mm=voxel_size_mm,
            )
        ]
    for path in written:
        print(path)


@data_app.command("info")
def data_info(paths: Annotated[list[Path], typer.Argument(help="Volume files (.h5) or split folders.")]) -> None:
    """Show shape, labels and class fractions of volumes."""
    from xctsam.data.split_folders import describe_volumes

    _err.print(describe_volumes(paths))
