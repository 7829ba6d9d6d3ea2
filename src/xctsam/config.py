"""params.yaml -> typed, validated configuration; the only module that reads params.yaml.

Every model forbids unknown keys, so a typo in params.yaml is refused with its dotted key path
instead of being silently ignored. Stage code receives these objects, never raw dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from xctsam import CLASS_NAMES
from xctsam.util import safe_yaml
from xctsam.util.errors import ConfigError, InputError

DEFAULT_PARAMS = Path("params.yaml")


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


# Every number in params is one of these. pydantic's lax mode reads YAML's `true` as 1 (a bool
# is an int in Python); its strict mode would refuse that, but also `lr: 1e-3`, which PyYAML
# reads as the string "1e-3". So: lax, except for booleans.
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]


class StrictModel(BaseModel):
    # allow_inf_nan=False: a float field refuses NaN and inf from any source (params files are
    # refused earlier, by safe_yaml, with the same message)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The materials the simulator has attenuation tables for (xctsam.sim.materials.MATERIALS holds
# one per name; a test keeps the two lists equal). Named here so params are checked on load.
MaterialName = Literal["steel", "316L", "Ti64", "Ni", "W", "Cu", "Al"]


# ---------------------------------------------------------------- phantoms
class LogNormalSize(StrictModel):
    """Radii in voxels: log-normal with this median and log-space standard deviation."""

    median: PositiveFloat
    sigma: NonNegativeFloat = 0.3


class DefectPopulation(StrictModel):
    """One kind of defect; `fraction` is its target share of the specimen's volume."""

    fraction: Fraction = 0.0
    radius: LogNormalSize = LogNormalSize(median=1.5)


class LackOfFusionPopulation(DefectPopulation):
    """Flat, irregular voids lying in the build (z) layers."""

    thickness: PositiveFloat = 1.0  # voxels across the layer
    irregularity: Fraction = 0.5  # 0: smooth ellipse, 1: ragged outline


class KeyholePopulation(DefectPopulation):
    """Near-spherical voids elongated along the build direction (z)."""

    elongation: Annotated[Float, Field(ge=1)] = 1.8


class DefectRecipe(StrictModel):
    gas_pore: DefectPopulation = DefectPopulation()
    lack_of_fusion: LackOfFusionPopulation = LackOfFusionPopulation()
    keyhole: KeyholePopulation = KeyholePopulation()
    inclusion: DefectPopulation = DefectPopulation()

    @property
    def pore_fraction(self) -> float:
        return self.gas_pore.fraction + self.lack_of_fusion.fraction + self.keyhole.fraction


class PhantomGeometry(StrictModel):
    """The coupon: a cylinder (axis z) holding CAD-like blocks, bars and rods with air between."""

    shape: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=16)], Annotated[Int, Field(ge=16)]]
    specimen_radius: Annotated[Float, Field(gt=0, le=1)] = 0.92  # of the in-plane half-width
    features: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] = (4, 9)
    feature_size: tuple[Fraction, Fraction] = (0.12, 0.4)  # of the specimen radius

    @model_validator(mode="after")
    def _ordered_ranges(self) -> PhantomGeometry:
        if self.shape[1] != self.shape[2]:
            raise ValueError("shape: slices must be square (Y == X) for the tomography")
        if self.features[0] > self.features[1]:
            raise ValueError("features: min greater than max")
        if self.feature_size[0] > self.feature_size[1]:
            raise ValueError("feature_size: min greater than max")
        return self


# ---------------------------------------------------------------- scanners
class Filtration(StrictModel):
    material: MaterialName = "Cu"
    thickness_mm: NonNegativeFloat = 0.5


class Scanner(StrictModel):
    """One scanner setting: source, detector and acquisition of a parallel-beam XCT scan."""

    kvp: Annotated[Float, Field(ge=20, le=600)]
    filter: Filtration = Filtration()
    photons: PositiveFloat = 2.0e4  # unattenuated counts per detector pixel and view
    views: Annotated[Int, Field(ge=8)] = 180
    detector_blur: NonNegativeFloat = 0.6  # Gaussian sigma, detector pixels
    ring_gain_std: NonNegativeFloat = 0.0  # relative per-pixel gain error -> rings
    energy_step_kev: PositiveFloat = 2.0
    geometry: Literal["parallel"] = "parallel"


class IdealRender(StrictModel):
    """Domain A: monochromatic, noise-free, sharp attenuation map of the labels."""

    energy_kev: PositiveFloat = 80.0


# ---------------------------------------------------------------- splits
class SplitRecipe(StrictModel):
    """How one split is made.

    kind `synthetic`: the idealised render (domain A), stored under data/synthetic/<split>.
    kind `real`: physics-simulated experimental scans standing in for real ones, stored under
    data/real/<split>, where imported real scans go too.
    """

    kind: Literal["synthetic", "real"]
    labelled: bool = True
    volumes: Annotated[Int, Field(ge=1)] = 1
    recipe: str
    alloy: MaterialName
    inclusion_material: MaterialName = "Ni"
    scanner: str | None = None

    @model_validator(mode="after")
    def _scanner_matches_kind(self) -> SplitRecipe:
        if self.kind == "real" and self.scanner is None:
            raise ValueError("a real (scanned) split needs a scanner")
        if self.kind == "synthetic" and self.scanner is not None:
            raise ValueError("a synthetic split is rendered without a scanner; remove scanner")
        if self.kind == "synthetic" and not self.labelled:
            raise ValueError("a synthetic split is labelled by construction; remove labelled")
        return self


class ImportSpec(StrictModel):
    source: Path
    format: Literal["samgan", "tiff-dir", "tiff", "hdf5", "npy"] = "samgan"


class DataConfig(StrictModel):
    voxel_size_mm: PositiveFloat = 0.025
    phantom: PhantomGeometry
    render: IdealRender = IdealRender()
    recipes: dict[str, DefectRecipe]
    scanners: dict[str, Scanner]
    splits: dict[str, SplitRecipe]
    imports: dict[str, ImportSpec] = {}


# ---------------------------------------------------------------- CycleGAN
class GeneratorConfig(StrictModel):
    filters: Annotated[Int, Field(ge=4)] = 32  # ngf: channels of the first convolution
    blocks: Annotated[Int, Field(ge=1)] = 6  # ResNet blocks at the bottleneck


class DiscriminatorConfig(StrictModel):
    filters: Annotated[Int, Field(ge=4)] = 32  # ndf
    layers: Annotated[Int, Field(ge=1)] = 3  # strided layers of the PatchGAN


class GanConfig(StrictModel):
    """Unpaired translation domain A (idealised render) <-> domain B (experimental scans)."""

    domain_a: str = "synthetic/Tr-sim"  # split folders under the data root
    domain_b: str = "real/Tr-real"
    output: str = "synthetic/Tr-GAN"  # where `gan synthesize` writes the translated split
    tile: Annotated[Int, Field(ge=16)] = 64
    batch: Annotated[Int, Field(ge=1)] = 4
    steps: Annotated[Int, Field(ge=1)] = 1000
    decay_start: Annotated[Int, Field(ge=0)] = 500  # LR held until here, then linear to 0
    lr: PositiveFloat = 2e-4
    beta1: Fraction = 0.5
    generator: GeneratorConfig = GeneratorConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    lambda_cycle: NonNegativeFloat = 10.0
    lambda_identity: NonNegativeFloat = 0.5  # times lambda_cycle, as in the reference code
    pool_size: Annotated[Int, Field(ge=0)] = 50
    checkpoint_every: Annotated[Int, Field(ge=1)] = 100
    sample_every: Annotated[Int, Field(ge=1)] = 250
    log_every: Annotated[Int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _decay_within_steps(self) -> GanConfig:
        if self.decay_start > self.steps:
            raise ValueError("decay_start: must not exceed steps")
        return self


# ---------------------------------------------------------------- SAM
class SmallSamConfig(StrictModel):
    """The CPU-sized SAM image encoder (no official checkpoint exists for it)."""

    embed_dim: Annotated[Int, Field(ge=16)] = 192
    depth: Annotated[Int, Field(ge=1)] = 4
    num_heads: Annotated[Int, Field(ge=1)] = 4
    global_attn_indexes: tuple[Int, ...] = (1, 3)
    window_size: Annotated[Int, Field(ge=0)] = 8

    @model_validator(mode="after")
    def _buildable(self) -> SmallSamConfig:
        # both would build and then fail at the first forward pass
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        outside = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if outside:
            raise ValueError(f"global_attn_indexes: {outside} outside blocks 0..{self.depth - 1}")
        return self


class ConvLoraConfig(StrictModel):
    """Conv-LoRA on every image-encoder block's fused qkv projection."""

    rank: Annotated[Int, Field(ge=1)] = 4
    alpha: PositiveFloat = 4.0  # LoRA scale is alpha / rank
    experts: Annotated[Int, Field(ge=1)] = 4  # expert i works at scale i (resize up by i)
    top_k: Annotated[Int, Field(ge=1)] = 1
    gate_noise: NonNegativeFloat = 1.0  # noisy top-k gating during training
    balance_weight: NonNegativeFloat = 0.01  # weight of the load-balancing loss
    gate_scales_output: bool = True  # the gate value scales the chosen expert, so the task trains the gate too

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> ConvLoraConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} exceeds experts {self.experts}")
        return self


class SamConfig(StrictModel):
    variant: Literal["small", "vit_b", "vit_l", "vit_h"] = "small"
    checkpoint: Path | None = None  # official file, e.g. models/foundation/sam_vit_b_01ec64.pth
    image_size: Literal[256, 512, 1024] = 256
    small: SmallSamConfig = SmallSamConfig()
    lora: ConvLoraConfig = ConvLoraConfig()
    # multiclass: one prompt-free decoder with a mask per class (softmax);
    # per_class: the study's layout, one binary model per class, painted material -> pore -> inclusion
    layout: Literal["multiclass", "per_class"] = "multiclass"


# ---------------------------------------------------------------- stand-in SAM foundation
class PretrainConfig(StrictModel):
    """Promptable pretraining of the small SAM on a generic shapes corpus (`xctsam train pretrain`).

    A section of its own, apart from `sam.lora` and `train`, so the DVC stage that makes the
    stand-in foundation reruns only when these keys (or sam.small / sam.image_size) change.
    """

    # names of stand-in checkpoints the pipeline makes (models/<name>.pth); [] at paper scale,
    # where sam.checkpoint names an official file and the pretrain stage disappears
    stand_ins: list[str] = ["sam_small_pretrained"]
    seed: Int = 0
    steps: Annotated[Int, Field(ge=1)] = 1800
    batch: Annotated[Int, Field(ge=1)] = 2  # images per step
    prompts: Annotated[Int, Field(ge=1)] = 4  # objects prompted per image per step (decoder cost grows with it)
    objects: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] = (3, 8)  # per image
    min_area: Annotated[Int, Field(ge=1)] = 150  # pixels: smaller visible parts are not objects
    box_share: Fraction = 0.5  # share of prompts that are boxes (the rest single points)
    box_jitter: Fraction = 0.1  # box corners moved by N(0, jitter x side), at most 20 px, as in SAM
    lr: PositiveFloat = 4e-4  # of the prompt encoder and mask decoder
    # the image encoder's lr is lr x this: SAM trained its (MAE-initialised) encoder with a
    # decayed lr; at a full lr the encoder drifts before the decoder has learned to localise
    encoder_lr_scale: Annotated[Float, Field(gt=0, le=1)] = 0.125
    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: Annotated[Int, Field(ge=0)] = 50
    grad_clip: PositiveFloat = 1.0
    # SAM's 20:1 focal:dice collapses the box output to empty masks in a CPU-sized pretraining
    # (held-out box mIoU .03 at 20, .22 at 4, .26 at 1, .17 at 0; 600 steps)
    focal_weight: NonNegativeFloat = 1.0
    dice_weight: NonNegativeFloat = 1.0
    iou_weight: NonNegativeFloat = 1.0  # MSE of the predicted against the real mask IoU
    heldout_images: Annotated[Int, Field(ge=1)] = 32  # seeded images apart from training, scored at the end
    checkpoint_every: Annotated[Int, Field(ge=1)] = 50

    @model_validator(mode="after")
    def _ordered_objects(self) -> PretrainConfig:
        if self.objects[0] > self.objects[1]:
            raise ValueError("objects: min greater than max")
        return self


# ---------------------------------------------------------------- 2.5D U-Net
class UNetConfig(StrictModel):
    context: Annotated[Int, Field(ge=1)] = 5  # adjacent slices as input channels (odd; edges reflected)
    filters: Annotated[Int, Field(ge=4)] = 16  # channels at the first level, doubled per level
    depth: Annotated[Int, Field(ge=2, le=6)] = 4  # resolution levels

    @model_validator(mode="after")
    def _odd_context(self) -> UNetConfig:
        if self.context % 2 == 0:
            raise ValueError(f"context: {self.context} must be odd (centre slice plus equal neighbours)")
        return self


# ---------------------------------------------------------------- training
class TrainConfig(StrictModel):
    """One training loop for every model; one instance per model under `train:`."""

    splits: list[str] = ["synthetic/Tr-GAN"]  # labelled split folders under the data root
    val_volumes: Annotated[Int, Field(ge=1)] = 1  # last volumes of the training splits held out for validation
    tile: Annotated[Int, Field(ge=16)] = 128  # native-resolution random crops
    batch: Annotated[Int, Field(ge=1)] = 4
    steps: Annotated[Int, Field(ge=1)] = 1000
    epoch_steps: Annotated[Int, Field(ge=1)] = 100  # validation, best checkpoint, early stopping per epoch
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    warmup_steps: Annotated[Int, Field(ge=0)] = 50
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: PositiveFloat = 1.0
    class_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat, PositiveFloat] = (1.0, 1.0, 3.0, 3.0)
    dice_weight: NonNegativeFloat = 1.0  # loss = CE + dice_weight * Dice
    oversample: Fraction = 0.5  # share of tiles drawn to contain a pore or inclusion
    patience: Annotated[Int, Field(ge=1)] = 5  # epochs without validation mIoU gain before stopping
    checkpoint_every: Annotated[Int, Field(ge=1)] = 100
    val_slices: Annotated[Int, Field(ge=1)] = 16  # validation slices (seeded), scored whole


class TrainSection(StrictModel):
    sam: TrainConfig = TrainConfig(lr=3e-4)
    unet: TrainConfig = TrainConfig()


# ---------------------------------------------------------------- inference and evaluation
class PredictConfig(StrictModel):
    tile: Annotated[Int, Field(ge=16)] = 128
    overlap: Annotated[Float, Field(ge=0, lt=1)] = 0.25  # of the tile, blended with a Gaussian window
    batch: Annotated[Int, Field(ge=1)] = 8


class EvalConfig(StrictModel):
    splits: list[str] = [f"real/Te-{i}" for i in range(1, 7)]


class FinetuneConfig(StrictModel):
    """Re-fine-tuning SAM-GAN on labelled real scans (SAM-FineReal-Sub and SAM-FineReal).

    `volumes` names the real volumes used for fine-tuning, per split folder; every other
    volume of `eval.splits` is what forgetting is measured on, and any overlap is refused.
    """

    volumes: dict[str, list[str]] = {f"real/Te-{i}": [f"Te-{i}_000.h5"] for i in range(1, 7)}
    sub_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.25  # SAM-FineReal-Sub's share of the fine-tuning slices
    steps: Annotated[Int, Field(ge=1)] = 300
    lr: PositiveFloat = 1e-4


class RobustnessConfig(StrictModel):
    """Models scored on chosen test splits with noise added to their normalised inputs."""

    splits: list[str] = ["real/Te-3"]
    gaussian: list[NonNegativeFloat] = [0.0, 0.02, 0.05, 0.1]  # std, in units of the model's window
    poisson: list[PositiveFloat] = [1000.0, 300.0, 100.0]  # photons at full scale (lower = noisier)


# ---------------------------------------------------------------- FID
class FidConfig(StrictModel):
    """Frechet distance of each test split (and named pairs) to the training set."""

    backbone: Literal["inception", "sam"] = "inception"
    reference: str = "synthetic/Tr-GAN"  # the training set, a split folder under the data root
    splits: list[str] = [f"real/Te-{i}" for i in range(1, 7)]
    pairs: dict[str, tuple[str, str]] = {}  # name -> (split folder, split folder)
    samples: Annotated[Int, Field(ge=2)] = 200  # slices per split, the same ones every run
    batch: Annotated[Int, Field(ge=1)] = 25
    # grey values mapped to [0, 1] for every split; null: robust window of the reference split.
    # Imported 8-bit scans compare best on their full range, [0, 255].
    window: tuple[Float, Float] | None = None

    @model_validator(mode="after")
    def _window_increasing(self) -> FidConfig:
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError("window: high must exceed low")
        return self


class StudyConfig(StrictModel):
    """Where the study's stages read their splits (dvc.yaml passes these to every stage).

    Embedded default: the simulated splits under data/, the CycleGAN making the training split.
    Real-data mode: `root` is an imported dataset (data/imported/<name>) whose training split is
    already GAN-translated, and `gan` is empty so the CycleGAN stages do not exist.
    """

    root: Path = Path("data")  # holds real/<Te-N> and synthetic/<training split>
    gan: list[Literal["cyclegan"]] = ["cyclegan"]  # [] removes gan_train and synthesize


# ---------------------------------------------------------------- hyperparameter search
TUNE_METRICS = ("val.miou", *(f"val.iou.{name}" for name in CLASS_NAMES))  # scores of the held-out validation slices
SearchValue = bool | int | float | str


class SearchDimension(StrictModel):
    """How one params key is drawn: `categorical` from `choices`, or `float`/`int` in [low, high]
    (`log`: log-uniform; `step`: a grid). Which key is xctsam.tune.space's business."""

    type: Literal["categorical", "float", "int"]
    choices: list[SearchValue] | None = None
    low: Float | None = None
    high: Float | None = None
    log: bool = False
    step: PositiveFloat | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical dimension needs a non-empty list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical dimension takes only choices")
            return self
        if self.choices is not None:
            raise ValueError(f"choices: a {self.type} dimension takes low/high, not choices")
        if self.low is None or self.high is None or not self.high > self.low:
            raise ValueError("low/high: give both, high greater than low")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: needs low > 0 and no step")
        return self


class TuneConfig(StrictModel):
    """`xctsam tune`: an Optuna search over any params keys, scored on held-out validation slices."""

    model: Literal["sam", "unet"] = "sam"
    space: dict[str, SearchDimension] = {}  # dotted params key -> how to draw it
    trial: dict[str, Any] = {}  # dotted params key -> value set in every trial (cheaper trials)
    metric: str = "val.miou"
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    n_trials: Annotated[Int, Field(ge=1)] = 20  # the study's total, shared by all its workers
    heartbeat_seconds: Annotated[Int, Field(ge=1)] = 10  # a worker silent for 2x this is dead; its trial is retried
    max_retry: Annotated[Int, Field(ge=0)] = 2

    @model_validator(mode="after")
    def _known_metric(self) -> TuneConfig:
        if self.metric not in TUNE_METRICS:
            raise ValueError(f"metric: '{self.metric}' is not one of {', '.join(TUNE_METRICS)}")
        return self


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
