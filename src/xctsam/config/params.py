"""The whole params.yaml: `Params` (every section, the study root) and its loading, the only reader of params.yaml.

Errors name the file and the dotted key (`params.yaml: train.sam.lr: ...`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from xctsam.config.base import Int, StrictModel
from xctsam.config.data import DataConfig
from xctsam.config.defects import DefectsConfig
from xctsam.config.eval import EvalConfig, FidConfig, PredictConfig, RobustnessConfig
from xctsam.config.gan import GanConfig
from xctsam.config.pretrain import PretrainConfig
from xctsam.config.sam import SamConfig
from xctsam.config.train import FinetuneConfig, TrainSection
from xctsam.config.tune import TuneConfig
from xctsam.config.unet import UNetConfig
from xctsam.util import safe_yaml
from xctsam.util.errors import ConfigError, InputError

DEFAULT_PARAMS = Path("params.yaml")


class StudyConfig(StrictModel):
    """Where the study's stages read their splits (dvc.yaml passes these to every stage).

    Embedded default: the simulated splits under data/, the CycleGAN making the training split.
    Real-data mode: `root` is an imported dataset (data/imported/<name>) whose training split is
    already GAN-translated, and `gan` is empty so the CycleGAN stages do not exist.
    """

    root: Path = Path("data")  # holds real/<Te-N> and synthetic/<training split>
    gan: list[Literal["cyclegan"]] = ["cyclegan"]  # [] removes gan_train and synthesize
    # The GAN ablation: each listed model trained again, same steps and seed, on the
    # untranslated render `ablation_split` (models/<model>-sim) and scored beside the GAN-trained
    # one. [] where there is no untranslated training split (the release ships only Tr-GAN).
    ablation: list[Literal["sam", "unet"]] = ["sam", "unet"]
    ablation_split: str = "synthetic/Tr-sim"



class Params(StrictModel):
    seed: Int = 0
    study: StudyConfig = StudyConfig()
    data: DataConfig
    gan: GanConfig = GanConfig()
    sam: SamConfig = SamConfig()
    unet: UNetConfig = UNetConfig()
    train: TrainSection = TrainSection()
    predict: PredictConfig = PredictConfig()
    eval: EvalConfig = EvalConfig()
    defects: DefectsConfig = DefectsConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    robustness: RobustnessConfig = RobustnessConfig()
    fid: FidConfig = FidConfig()
    tune: TuneConfig = TuneConfig()
    pretrain: PretrainConfig = PretrainConfig()
    # zero-shot baselines: name -> pretrained SAM checkpoint (the stand-in or an official file);
    # one `zero_shot@<name>` stage each, none by default
    zero_shot: dict[str, Path] = {}


# ---------------------------------------------------------------- loading
def _cross_references(params: Params) -> list[tuple[str, str]]:
    """Names a split refers to must be defined; returns (dotted key, problem) pairs."""
    problems: list[tuple[str, str]] = []
    data = params.data
    for name, split in data.splits.items():
        key = f"data.splits.{name}"
        if split.recipe not in data.recipes:
            problems.append((f"{key}.recipe", f"unknown recipe '{split.recipe}' (defined: {', '.join(data.recipes)})"))
        if split.scanner is not None and split.scanner not in data.scanners:
            problems.append((f"{key}.scanner", f"unknown scanner '{split.scanner}' (defined: {', '.join(data.scanners)})"))
    return problems


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _message(error: Any) -> str:
    """One pydantic error in the words params messages use."""
    if error["type"] == "extra_forbidden":
        return "unknown key; check its spelling against params.yaml's documented keys"
    if error["type"] == "literal_error":
        return f"unknown value {error['input']!r}; {error['msg'].lower()}"
    if error["type"] == "finite_number":
        return f"must be a finite number, got {error['input']}"
    # pydantic puts model-level validator errors at the model's own location
    return error["msg"].removeprefix("Value error, ")


def parse_params(raw: object, source: Path | str = DEFAULT_PARAMS) -> Params:
    """Validate a parsed params mapping; the first problem becomes a ConfigError."""
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ConfigError(source, _dotted(errors[0]["loc"]) or "<top>", _message(errors[0]) + more) from None
    problems = _cross_references(params)
    if problems:
        key, problem = problems[0]
        raise ConfigError(source, key, problem)
    return params


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "params file not found", "run from the project root or pass --params")
    return parse_params(safe_yaml.load(path.read_text(), path), path)
