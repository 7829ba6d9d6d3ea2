"""`xctsam predict`: segment one scan or a whole campaign of them into files users open.

- Inputs (`scans.scan_inputs`): volume files of any format `Scan` reads, zarr folders, folders
  of TIFF slices, or folders holding such volumes.
- Outputs (`plan_jobs`): one named file (`--out x.tif`), or a folder with one output per scan,
  `<out>/<scan name><suffix>`, the suffix from `--out-format` or, by default, the input's
  family (TIFF in, TIFF out; zarr in, OME-Zarr out; HDF5 or NPY in, a project volume out).
- Sharding (`shard_from_env`): `--shard i/n`, else a SLURM job array's task index and count,
  else torchrun's RANK / WORLD_SIZE; scan k goes to shard k mod n, so every task of an array
  job, given the same inputs, takes a disjoint share and together they cover them all.
- Reruns: an output that exists is kept and its scan skipped (outputs are written atomically,
  so an existing one is complete); an interrupt loses only the scan in progress.
- Before the first scan: the memory a slice needs and a time estimate from one timed batch.
- `uncertainty`: each output's entropy map beside it; params `predict.tta` mirrors every tile.
- `defects`: each part's defect report beside its output (`report_part`, eval.part_report):
  part volume, porosity, inclusion fraction, every pore and inclusion with size and position.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from xctsam import NUM_CLASSES
from xctsam.config.defects import DefectsConfig
from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.scans import Scan, scan_format
from xctsam.data.volumes import IMAGE
from xctsam.eval.part_report import part_defects, write_part_report
from xctsam.eval.predict import (
    SlicePrediction,
    SliceTransform,
    batch_probabilities,
    check_prediction_memory,
    predict_volume,
    tile_starts,
    working_memory,
)
from xctsam.eval.writers import (
    FORMATS_BY_SUFFIX,
    SUFFIX_OF,
    OutputFormat,
    open_labels,
    refuse_overwriting,
    uncertainty_path,
    write_prediction,
)
from xctsam.models.base import Segmenter
from xctsam.util.device import pick_device
from xctsam.util.errors import InputError
from xctsam.util.progress import console, enabled, progress_bar

OUTPUT_BY_INPUT: dict[str, OutputFormat] = {"tiff": "tiff", "tiff-dir": "tiff", "zarr": "zarr", "hdf5": "hdf5", "npy": "hdf5"}


class Job(NamedTuple):
    source: Path
    out: Path


class Shard(NamedTuple):
    index: int  # 0-based
    count: int


# ---------------------------------------------------------------- planning
def scan_stem(path: Path) -> str:
    """The scan's name without its format suffixes: part_7.ome.zarr -> part_7."""
    name = path.name
    for suffix in (".zarr", ".ome", *FORMATS_BY_SUFFIX, ".npy"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name or path.name


def _is_output_file(out: Path) -> bool:
    return out.suffix.lower() in FORMATS_BY_SUFFIX and not (out.is_dir() and out.suffix.lower() != ".zarr")


def plan_jobs(sources: Sequence[Path], out: Path, out_format: OutputFormat | None, input_format: str | None = None) -> list[Job]:
    """(scan, output) pairs: `out` itself for one scan and a file name, else one file per scan
    in the folder `out`; two scans that would share an output are refused."""
    if _is_output_file(out):
        if len(sources) != 1:
            raise InputError(out, f"is one output file for {len(sources)} scans", "give a folder as --out (one output per scan)")
        return [Job(sources[0], out)]
    jobs = []
    for source in sources:
        fmt = out_format or OUTPUT_BY_INPUT[input_format or scan_format(source)]
        jobs.append(Job(source, out / f"{scan_stem(source)}{SUFFIX_OF[fmt]}"))
    seen: dict[Path, Path] = {}
    for job in jobs:
        if job.out in seen:
            raise InputError(job.source, f"and {seen[job.out]} would both be written to {job.out}", "rename one, or predict them into different folders")
        seen[job.out] = job.source
    return jobs


def parse_shard(text: str) -> Shard:
    """'i/n' with 0 <= i < n; anything else is a ValueError naming the form."""
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        raise ValueError(f"--shard {text!r} is not i/n (e.g. 0/4)") from None
    if not sep or shard.count < 1 or not 0 <= shard.index < shard.count:
        raise ValueError(f"--shard {text!r}: need 0 <= i < n")
    return shard


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """This process's share: a SLURM array task (index relative to the array's first task),
    else a torchrun rank, else everything."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return parse_shard(f"{int(env['SLURM_ARRAY_TASK_ID']) - first}/{int(env['SLURM_ARRAY_TASK_COUNT'])}")
    if "RANK" in env and "WORLD_SIZE" in env:
        return parse_shard(f"{int(env['RANK'])}/{int(env['WORLD_SIZE'])}")
    return Shard(0, 1)


def shard_jobs(jobs: Sequence[Job], shard: Shard) -> list[Job]:
    return list(jobs[shard.index :: shard.count])


# ---------------------------------------------------------------- estimates
class Estimate(NamedTuple):
    memory_bytes: int
    seconds: float
    tiles_per_slice: int


def tiles_per_slice(shape: tuple[int, int, int], config: PredictConfig) -> int:
    height, width = (max(size, config.tile) for size in shape[1:])
    return len(tile_starts(height, config.tile, config.overlap)) * len(tile_starts(width, config.tile, config.overlap))


def seconds_per_tile(model: Segmenter, config: PredictConfig, device: torch.device) -> float:
    """Time of one batch of tiles as prediction runs it (TTA views and temperature included; the
    second of two: the first pays one-off set-up) per tile."""
    inputs = torch.zeros(config.batch, int(model.context), config.tile, config.tile, device=device)
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            for _ in range(2):
                start = time.perf_counter()
                batch_probabilities(model, inputs, config)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / config.batch
    finally:
        model.train(was_training)


def estimate(model: Segmenter, shape: tuple[int, int, int], config: PredictConfig, per_tile: float) -> Estimate:
    """Working memory (slice buffers, weights, one batch in and out) and predicted time (each
    tri-planar pass counted as one more z pass: a rough figure, its planes differ in shape)."""
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    batch = config.batch * (int(model.context) + NUM_CLASSES) * config.tile**2 * 4
    tiles = tiles_per_slice(shape, config)
    return Estimate(working_memory(shape, int(model.context), config.tile) + weights + batch, per_tile * tiles * shape[0] * len(config.planes), tiles)


def describe(source: Path, shape: tuple[int, int, int], dtype: np.dtype, found: Estimate) -> str:
    z, y, x = shape
    return f"{source}: {z} x {y} x {x} {dtype}, {found.tiles_per_slice} tiles per slice; about {found.memory_bytes / 2**20:.0f} MiB and {_duration(found.seconds)}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- running
def predict_file(
    model: Segmenter,
    source_path: Path,
    window: IntensityWindow,
    config: PredictConfig,
    out: Path,
    *,
    input_format: str | None = None,
    dataset: str = IMAGE,
    out_format: OutputFormat | None = None,
    device: torch.device | str | None = None,
    attrs: Mapping[str, Any] | None = None,
    transform: SliceTransform | None = None,
    progress: bool = True,
    uncertainty: bool = False,
) -> Path:
    """Segment one scan and write its labels to `out` (atomically), with `uncertainty` its
    entropy map beside it (`writers.uncertainty_path`)."""
    with Scan(source_path, input_format, dataset) as source:
        check_scan(model, source, out, config)
        predictions = predict_volume(model, source, window, config, device, transform=transform, progress=progress)
        return write_scan(predictions, source, window, config, out, out_format, attrs, uncertainty)


def check_scan(model: Segmenter, source: Scan, out: Path, config: PredictConfig) -> None:
    """What can be refused before the model runs (predict_volume starts only when the writer
    pulls a slice): an output onto the input, slices too large for memory."""
    refuse_overwriting(Path(out), source.path)
    check_prediction_memory(source, int(model.context), config.tile)


def write_scan(
    predictions: Iterator[SlicePrediction], source: Scan, window: IntensityWindow, config: PredictConfig, out: Path,
    out_format: OutputFormat | None, attrs: Mapping[str, Any] | None, uncertainty: bool,
) -> Path:
    """A scan's streamed predictions to `out` with their provenance (and the uncertainty map)."""
    provenance = {"source": str(source.path), "window": window.to_dict(), "predict": config.model_dump(), **dict(attrs or {})}
    return write_prediction(predictions, out, source, out_format, provenance, uncertainty_path(out) if uncertainty else None)


def report_part(out: Path, defects: DefectsConfig, voxel_size: float | None = None) -> list[Path]:
    """The part's defect report (CSV, JSON, histogram PNG) from a written prediction, beside it:
    `<name>.defects.*`. A voxel size (mm) gives sizes and volumes in mm."""
    config = defects if voxel_size is None else defects.model_copy(update={"diameter_unit": "mm"})
    with open_labels(out) as labels:
        report = part_defects(labels.raw, labels.shape, config, voxel_size=voxel_size or 1.0)
    return write_part_report(report, Path(out).parent, scan_stem(Path(out)))


def report_path(out: Path) -> Path:
    return Path(out).parent / f"{scan_stem(Path(out))}.defects.json"


class CampaignResult(NamedTuple):
    written: list[Path]
    kept: list[Path]  # outputs that already existed: their scans were skipped


def predict_campaign(
    model: Segmenter,
    window: IntensityWindow,
    jobs: Sequence[Job],
    config: PredictConfig,
    *,
    input_format: str | None = None,
    dataset: str = IMAGE,
    out_format: OutputFormat | None = None,
    device: torch.device | str | None = None,
    attrs: Mapping[str, Any] | None = None,
    uncertainty: bool = False,
    defects: DefectsConfig | None = None,
    voxel_size: float | None = None,
) -> CampaignResult:
    """Predict every job whose output does not exist yet, with a bar per scan and overall; with
    `defects`, each part's defect report too (also for kept outputs that have none yet)."""
    device = torch.device(device) if device is not None else pick_device()
    for job in jobs:  # an output onto its own scan is an error, not a finished job to skip
        refuse_overwriting(job.out, job.source)
    todo = [job for job in jobs if not job.out.exists()]
    kept = [job.out for job in jobs if job.out.exists()]
    for out in kept:
        console.print(f"kept {out} (exists; delete it to predict its scan again)")
        if defects is not None and not report_path(out).exists():
            report_part(out, defects, voxel_size)
    if not todo:
        return CampaignResult([], kept)
    per_tile = seconds_per_tile(model, config, device)
    written = []
    with _Bars(len(todo)) as bars:
        for job in todo:
            with Scan(job.source, input_format, dataset) as source:
                check_scan(model, source, job.out, config)
                bars.note(describe(job.source, source.shape, source.dtype, estimate(model, source.shape, config, per_tile)))
                predictions = bars.counted(predict_volume(model, source, window, config, device, progress=False), job.source.name, source.n_slices)
                write_scan(predictions, source, window, config, job.out, out_format, attrs, uncertainty)
            if defects is not None:
                report_part(job.out, defects, voxel_size)
            written.append(job.out)
            bars.scan_done()
    return CampaignResult(written, kept)


class _Bars:
    """One rich display: the scans done overall and the slices of the scan in progress."""

    def __init__(self, scans: int) -> None:
        self._progress = progress_bar() if enabled() else None
        self._scans = scans

    def __enter__(self) -> _Bars:
        if self._progress is not None:
            self._progress.__enter__()
            self._overall = self._progress.add_task("scans", total=self._scans)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def counted(self, predictions: Iterator[SlicePrediction], name: str, slices: int) -> Iterator[SlicePrediction]:
        if self._progress is None:
            yield from predictions
            return
        task = self._progress.add_task(f"predict {name}", total=slices)
        for prediction in predictions:
            yield prediction
            self._progress.advance(task)

    def note(self, text: str) -> None:
        """A line above the bars (only where bars are shown: XCTSAM_NO_PROGRESS keeps stderr for errors)."""
        if self._progress is not None:
            self._progress.console.print(text)

    def scan_done(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._overall)
