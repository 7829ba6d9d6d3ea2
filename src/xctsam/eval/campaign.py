"""`xctsam predict`: segment one scan or a whole campaign of them into files users open.

- Inputs (`scans.scan_inputs`): volume files of any format `Scan` reads, zarr folders, folders
  of TIFF slices, or folders holding such volumes.
- Outputs (`plan_jobs`): one named file (`--out x.tif`), or a folder with one output per scan,
  `<out>/<scan name><suffix>`, the suffix from `--out-format` or, by default, the input's
  family (TIFF in, TIFF out; zarr in, OME-Zarr out; HDF5 or NPY in, a project volume out).
  Side files (uncertainty map, defect report, the record of `eval.finished`) are planned with
  them: two scans whose files would share a name are refused before any work.
- Sharding (`shard_from_env`): `--shard i/n`, else a SLURM job array task's position among the
  array's tasks, else torchrun's RANK / WORLD_SIZE; scan k goes to shard k mod n, so every task
  of an array job, given the same inputs, takes a disjoint share and together they cover them all.
- Reruns (`eval.finished`): an output its record names as finished is kept and its scan skipped,
  its missing side files written again (a report from the output, a map by predicting again);
  any other file where the campaign would write is the user's: refused before any work, never
  replaced. An interrupt or a full disk loses only the scan in progress.
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
from xctsam.eval.finished import Record, record_path
from xctsam.eval.part_report import part_defects, report_paths, write_part_report
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
    write_uncertainty,
)
from xctsam.models.base import Segmenter
from xctsam.util.device import pick_device
from xctsam.util.errors import InputError, XctsamError
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


def plan_jobs(
    sources: Sequence[Path], out: Path, out_format: OutputFormat | None, input_format: str | None = None, *,
    uncertainty: bool = False, report: bool = False,
) -> list[Job]:
    """(scan, output) pairs: `out` itself for one scan and a file name, else one file per scan
    in the folder `out`; two scans that would share an output or a side file are refused."""
    if _is_output_file(out):
        if len(sources) != 1:
            raise InputError(out, f"is one output file for {len(sources)} scans", "give a folder as --out (one output per scan)")
        return [Job(sources[0], out)]
    jobs = []
    for source in sources:
        fmt = out_format or OUTPUT_BY_INPUT[input_format or scan_format(source)]
        jobs.append(Job(source, out / f"{scan_stem(source)}{SUFFIX_OF[fmt]}"))
    refuse_shared(jobs, uncertainty, report)
    return jobs


def side_groups(out: Path, uncertainty: bool, report: bool) -> list[list[Path]]:
    """The files written beside output `out`, by what writes them together: its uncertainty
    map; its defect report (CSV, JSON, PNG)."""
    maps = [[uncertainty_path(out)]] if uncertainty else []
    return maps + ([report_paths(Path(out).parent, scan_stem(Path(out)))] if report else [])


def side_files(out: Path, uncertainty: bool, report: bool) -> list[Path]:
    return [path for group in side_groups(out, uncertainty, report) for path in group]


def refuse_shared(jobs: Sequence[Job], uncertainty: bool, report: bool) -> None:
    """Refuse two scans that would write one file: an output, a side file or a record (part.npy
    and part.tif make part.h5 and part.tif, but one part.defects.csv). Checked over all scans,
    before sharding, so the tasks of an array job never race for a file."""
    seen: dict[Path, Path] = {}
    for job in jobs:
        for path in (job.out, record_path(job.out), *side_files(job.out, uncertainty, report)):
            if path in seen and seen[path] != job.source:
                raise InputError(job.source, f"and {seen[path]} would both be written to {path}", "rename one, or predict them into different folders")
            seen[path] = job.source


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


SLURM_ARRAY = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP", "SLURM_ARRAY_TASK_COUNT")


def shard_from_env(env: Mapping[str, str] | None = None) -> Shard:
    """This process's share: a SLURM array task (`slurm_shard`), else a torchrun rank, else
    everything. Variables that give no share are one line (XctsamError) naming them."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return slurm_shard(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _ints(env, ("RANK", "WORLD_SIZE"), "torchrun rank")
        if not 0 <= rank < world:
            raise _env_error(env, ("RANK", "WORLD_SIZE"), "torchrun rank", "is not a rank of the world size")
        return Shard(rank, world)
    return Shard(0, 1)


def slurm_shard(env: Mapping[str, str]) -> Shard:
    """A SLURM array task's position among the array's tasks and their count.

    SLURM names the array by its first and last index and a step (`0-30:10`: MIN 0, MAX 30,
    STEP 10, COUNT 4); the position is (ID - MIN) / STEP when those describe COUNT evenly spaced
    tasks. A list with gaps (`1,2,5`) is not so described and no variable lists its indices, so
    the task's position is unknown: refused, asking for `--shard i/n`.
    """
    task, count = _ints(env, ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), "SLURM array task")
    first, step = _ints({"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1", **env}, ("SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"), "SLURM array task")
    last = first + step * (count - 1)
    if "SLURM_ARRAY_TASK_MAX" in env:
        (last,) = _ints(env, ("SLURM_ARRAY_TASK_MAX",), "SLURM array task")
    index, offset = divmod(task - first, step) if step > 0 else (-1, 0)
    if count < 1 or offset or not 0 <= index < count or last != first + step * (count - 1):
        raise _env_error(env, SLURM_ARRAY, f"SLURM array task {task}", "is not one of evenly spaced tasks (an --array list with gaps?), so its share of the scans is unknown")
    return Shard(index, count)


def _ints(env: Mapping[str, str], names: Sequence[str], what: str) -> list[int]:
    try:
        return [int(env[name]) for name in names]
    except ValueError:
        raise _env_error(env, names, what, "is not a whole number") from None


def _env_error(env: Mapping[str, str], names: Sequence[str], what: str, problem: str) -> XctsamError:
    shown = ", ".join(f"{name}={env[name]}" for name in names if name in env)
    return XctsamError(f"{what}: {problem} ({shown}); pass --shard i/n (this task's position i among the n tasks, from 0)")


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
    out_format: OutputFormat | None, attrs: Mapping[str, Any] | None, uncertainty: bool, *, labels: bool = True,
) -> Path:
    """A scan's streamed predictions to `out` with their provenance (and the uncertainty map);
    without `labels`, the uncertainty map alone (beside an output kept from an earlier run)."""
    provenance = {"source": str(source.path), "window": window.to_dict(), "predict": config.model_dump(), **dict(attrs or {})}
    if not labels:
        return write_uncertainty(predictions, uncertainty_path(out), source, provenance)
    return write_prediction(predictions, out, source, out_format, provenance, uncertainty_path(out) if uncertainty else None)


def report_part(out: Path, defects: DefectsConfig, voxel_size: float | None = None) -> list[Path]:
    """The part's defect report (CSV, JSON, histogram PNG) from a written prediction, beside it:
    `<name>.defects.*`. A voxel size (mm) gives sizes and volumes in mm."""
    config = defects if voxel_size is None else defects.model_copy(update={"diameter_unit": "mm"})
    with open_labels(out) as labels:
        report = part_defects(labels.raw, labels.shape, config, voxel_size=voxel_size or 1.0)
    return write_part_report(report, Path(out).parent, scan_stem(Path(out)))


class CampaignResult(NamedTuple):
    written: list[Path]
    kept: list[Path]  # outputs finished by an earlier run: their scans were skipped


class ScanPlan(NamedTuple):
    """What this run writes for one scan: its output and side files, or for an output finished
    earlier (`kept`) only the side files it lacks."""

    job: Job
    record: Record
    kept: bool
    files: list[Path]

    @property
    def predicts(self) -> bool:
        """Whether the model runs on the scan: for its output, or for a map a kept one lacks."""
        return not self.kept or uncertainty_path(self.job.out) in self.files

    @property
    def reports(self) -> bool:
        return bool(set(report_paths(self.job.out.parent, scan_stem(self.job.out))) & set(self.files))


def plan_scan(job: Job, uncertainty: bool, report: bool) -> ScanPlan:
    """A scan's plan; files in its way that are not the campaign's own are refused (before any
    work: the campaign plans every scan first)."""
    refuse_overwriting(job.out, job.source)  # an output onto its own scan is an error, not a finished job
    record = Record.read(job.out)
    sides = side_files(job.out, uncertainty, report)
    record.refuse_foreign([job.out, *sides])
    if record.finished():  # a report is written whole, its three files together
        lacking = [group for group in side_groups(job.out, uncertainty, report) if not all(map(record.owns, group))]
        return ScanPlan(job, record, True, [path for group in lacking for path in group])
    return ScanPlan(job, record, False, [job.out, *sides])


def _note_kept(plan: ScanPlan) -> None:
    console.print(f"kept {plan.job.out} (finished; delete it to predict its scan again)")
    if plan.files:
        console.print(f"{plan.job.out}: writing what it lacks: {', '.join(path.name for path in plan.files)}")
    for lost in sorted(set(plan.record.missing()) - set(plan.files)):
        console.print(f"{plan.job.out}: {lost.name} is missing; --uncertainty / --report write it again")


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
    """Predict every scan whose output is not finished, with a bar per scan and overall; with
    `uncertainty` / `defects`, each scan's map / defect report too (also for kept outputs that
    lack them). Every scan is planned, and files in the way refused, before the first is read."""
    device = torch.device(device) if device is not None else pick_device()
    refuse_shared(jobs, uncertainty, defects is not None)
    plans = [plan_scan(job, uncertainty, defects is not None) for job in jobs]
    for plan in plans:
        if plan.kept:
            _note_kept(plan)
    todo = [plan for plan in plans if plan.files]
    predicting = [plan for plan in todo if plan.predicts]
    per_tile = seconds_per_tile(model, config, device) if predicting else 0.0
    with _Bars(len(predicting)) as bars:
        for plan in todo:
            if not plan.kept:
                plan.record.discard()  # side files of a prediction that is gone
            with plan.record.writing(plan.files):
                if plan.predicts:
                    with Scan(plan.job.source, input_format, dataset) as source:
                        check_scan(model, source, plan.job.out, config)
                        bars.note(describe(plan.job.source, source.shape, source.dtype, estimate(model, source.shape, config, per_tile)))
                        predictions = bars.counted(predict_volume(model, source, window, config, device, progress=False), plan.job.source.name, source.n_slices)
                        write_scan(predictions, source, window, config, plan.job.out, out_format, attrs, uncertainty, labels=not plan.kept)
                if defects is not None and plan.reports:
                    report_part(plan.job.out, defects, voxel_size)
            if plan.predicts:
                bars.scan_done()
    return CampaignResult([plan.job.out for plan in todo if not plan.kept], [plan.job.out for plan in plans if plan.kept])


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
