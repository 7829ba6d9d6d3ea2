"""CycleGAN building blocks: ResNet generator, PatchGAN discriminator, image history pool.

The architecture follows Zhu et al. (2017) and their reference code (pytorch-CycleGAN-and-pix2pix):
reflection padding, instance normalisation without affine parameters, two stride-2 downsamplings,
ResNet blocks at the bottleneck, two transposed-convolution upsamplings and a tanh output in
[-1, 1]; a 70x70-style PatchGAN critic; weights drawn from N(0, 0.02). Images are single-channel
XCT slices.

A generator may take `noise_channels` of N(0, 1) noise beside the image (as augmented CycleGAN
and StyleGAN's noise inputs do): a deterministic map of the noise-free render can only give
noise-free output, so without them the translated slices lack the scanner's grain. The noise is
drawn from torch's RNG in training and from a seeded generator when translating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xctsam.data.datasets import IntensityWindow
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError
from xctsam.util.torch_files import load_torch_file

TRANSLATOR_FORMAT = "xctsam.cyclegan.translator/1"
DOWNSAMPLINGS = 2
SIZE_MULTIPLE = 2**DOWNSAMPLINGS  # H and W must be multiples of this inside the generator


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for convolution weights, zero biases (the reference 'normal' init)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _conv_norm_relu(channels_in: int, channels_out: int, **conv: Any) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, **conv), nn.InstanceNorm2d(channels_out), nn.ReLU(inplace=True)]


class ResnetBlock(nn.Module):
    """x + conv-norm-relu-conv-norm(x), reflection padded so the size is kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            *_conv_norm_relu(channels, channels, kernel_size=3),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Image-to-image generator; any H x W works (padded to a multiple of 4 and cropped back).

    With `noise_channels` > 0 the first convolution also sees that many channels of N(0, 1)
    noise, drawn at every call (from `noise` if given, else torch's global RNG).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, filters: int = 32, blocks: int = 6, noise_channels: int = 0) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "filters": filters, "blocks": blocks, "noise_channels": noise_channels}
        self.noise_channels = noise_channels
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), *_conv_norm_relu(in_channels + noise_channels, filters, kernel_size=7)]
        for i in range(DOWNSAMPLINGS):
            width = filters * 2**i
            layers += _conv_norm_relu(width, width * 2, kernel_size=3, stride=2, padding=1)
        bottleneck = filters * 2**DOWNSAMPLINGS
        layers += [ResnetBlock(bottleneck) for _ in range(blocks)]
        for i in reversed(range(DOWNSAMPLINGS)):
            width = filters * 2 ** (i + 1)
            layers += [
                nn.ConvTranspose2d(width, width // 2, kernel_size=3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(filters, out_channels, kernel_size=7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor, noise: torch.Generator | None = None) -> torch.Tensor:
        if self.noise_channels:
            z = torch.randn((x.shape[0], self.noise_channels, *x.shape[2:]), generator=noise, device=x.device, dtype=x.dtype)
            x = torch.cat([x, z], dim=1)
        height, width = x.shape[-2:]
        pad_y, pad_x = -height % SIZE_MULTIPLE, -width % SIZE_MULTIPLE
        if pad_y or pad_x:
            # replicate, not reflect: reflection needs the pad to be smaller than the image
            x = F.pad(x, (0, pad_x, 0, pad_y), mode="replicate")
        return self.model(x)[..., :height, :width]


class PatchDiscriminator(nn.Module):
    """PatchGAN critic: one real/fake score per overlapping patch (no sigmoid: least squares)."""

    def __init__(self, in_channels: int = 1, filters: int = 64, layers: int = 3) -> None:
        super().__init__()
        self.layers = layers
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, filters, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        width = filters
        for n in range(1, layers + 1):
            wider = filters * min(2**n, 8)
            stride = 2 if n < layers else 1  # the last of these keeps the size, as in the reference
            blocks += [
                nn.Conv2d(width, wider, kernel_size=4, stride=stride, padding=1),
                nn.InstanceNorm2d(wider),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = wider
        blocks.append(nn.Conv2d(width, 1, kernel_size=4, stride=1, padding=1))
        self.model = nn.Sequential(*blocks)
        init_weights(self)

    @staticmethod
    def output_size(size: int, layers: int) -> int:
        """Side of the patch map for a `size` input: each stride-2 conv halves, each stride-1 conv takes one."""
        for _ in range(layers):
            size //= 2
        return size - 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ImagePool:
    """History of generated images (Shrivastava et al. 2017) the discriminator also sees.

    Until `size` images are stored, each query returns its own images; after that each image is,
    with probability 1/2, swapped for a random stored one. Seeded, and its state (images and
    random stream) round-trips through state_dict() for exact resume.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = np.random.default_rng(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        returned = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                returned.append(image)
            elif self.rng.random() < 0.5:
                index = int(self.rng.integers(self.size))
                returned.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                returned.append(image)
        return torch.cat(returned)

    def state_dict(self) -> dict[str, Any]:
        stacked = torch.cat(self.images) if self.images else torch.empty(0)
        return {"images": stacked.cpu(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        images = state["images"]
        self.images = [image.unsqueeze(0).to(device) for image in images] if images.numel() else []
        self.rng.bit_generator.state = state["rng"]


# ---------------------------------------------------------------- using a trained generator
def to_net(unit: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[0, 1] (IntensityWindow.normalise) -> [-1, 1], the range of the generator's tanh."""
    return torch.as_tensor(unit) * 2.0 - 1.0


def from_net(values: torch.Tensor) -> np.ndarray:
    return ((values.detach().cpu().numpy() + 1.0) / 2.0).astype(np.float32)


@dataclass
class Translator:
    """An A->B generator with the intensity windows of both domains: grey values in, grey values out."""

    generator: ResnetGenerator
    window_a: IntensityWindow
    window_b: IntensityWindow
    step: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def unit(self, slab: np.ndarray, batch: int = 8, noise_seed: int = 0) -> np.ndarray:
        """(Z, Y, X) domain-A grey values -> translated slices in domain B's [0, 1] units.

        A generator with noise inputs draws them from a torch generator seeded with
        `noise_seed`, so the same slab and seed give the same output (and torch's global RNG,
        which training checkpoints, is left alone).
        """
        noise = torch.Generator(device=self.device).manual_seed(noise_seed)
        out = []
        with torch.no_grad():
            for z0 in range(0, slab.shape[0], batch):
                x = to_net(self.window_a.normalise(slab[z0 : z0 + batch])[:, None]).to(self.device)
                out.append(from_net(self.generator(x, noise))[:, 0])
        return np.concatenate(out) if out else np.zeros_like(slab, dtype=np.float32)

    def __call__(self, slab: np.ndarray, batch: int = 8, noise_seed: int = 0) -> np.ndarray:
        """(Z, Y, X) domain-A grey values -> domain-B grey values (float32)."""
        return self.window_b.denormalise(self.unit(slab, batch, noise_seed))

    def save(self, path: Path) -> None:
        """Everything `synthesize` needs, written atomically."""
        state = {
            "format": TRANSLATOR_FORMAT,
            "generator": dict(self.generator.config),
            "state_dict": {k: v.cpu() for k, v in self.generator.state_dict().items()},
            "window_a": self.window_a.to_dict(),
            "window_b": self.window_b.to_dict(),
            "step": self.step,
            "meta": self.meta,
        }
        with atomic_path(Path(path)) as tmp:
            torch.save(state, tmp)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> Translator:
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "generator file not found", "run `xctsam gan train` first")
        state = load_torch_file(path, "run `xctsam gan train` again")
        if not isinstance(state, dict) or state.get("format") != TRANSLATOR_FORMAT:
            raise InputError(path, f"not an xctsam CycleGAN generator file ({TRANSLATOR_FORMAT})", "give the generator_a2b.pt written by `xctsam gan train`")
        generator = ResnetGenerator(**state["generator"]).to(device)
        generator.load_state_dict(state["state_dict"])
        generator.eval()
        return cls(generator, IntensityWindow(**state["window_a"]), IntensityWindow(**state["window_b"]), int(state["step"]), dict(state["meta"]))
