"""Build Segment Anything from the segment-anything package's own modules, at any image size.

`build_sam` assembles ImageEncoderViT / PromptEncoder / MaskDecoder / TwoWayTransformer exactly
as `segment_anything.build_sam._build_sam` does, except that the image size is a parameter
(256 / 512 / 1024; patch 16, so the embedding grid is image_size / 16) and that a CPU-sized
`small` encoder exists beside the official vit_b / vit_l / vit_h.

`load_sam_checkpoint` loads an official checkpoint (or a user's own state dict) strictly:
- the file's sha256 must start with the hex suffix of its name, as in the official names
  sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth (a name without such a
  suffix is a user's own checkpoint: loaded, reported "unverified");
- missing or unexpected keys, or shapes that differ, are refused with the keys named;
- a checkpoint trained at another image size is adapted the way SAM fine-tuning repos
  (SAMed, MedSAM) do it: the absolute position embedding is resized bicubically to the new
  grid and the relative position tables of the global-attention blocks linearly to the new
  length. Window-attention blocks keep window 14, so their tables fit unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from xctsam.config.sam import SamConfig
from xctsam.util.compat import ensure_torchvision
from xctsam.util.errors import InputError, listed
from xctsam.util.hashing import file_sha256
from xctsam.util.torch_files import load_torch_file

ensure_torchvision()  # segment_anything imports torchvision, which needs the CPU shim here

from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
OFFICIAL_WINDOW_SIZE = 14
POS_EMBED_KEY = "image_encoder.pos_embed"
_REL_POS_SUFFIXES = (".attn.rel_pos_h", ".attn.rel_pos_w")
# Official names end in the first 6 hex digits of the file's sha256 (sam_vit_b_01ec64.pth);
# only names of that form are checked, so a user's `run_20240101.pth` is not mistaken for one.
_HASH_SUFFIX = re.compile(r"^sam_vit_[bhl]_([0-9a-f]{6,64})$", re.IGNORECASE)


@dataclass(frozen=True)
class EncoderSpec:
    """Hyper-parameters of a SAM image encoder (ViT with windowed and global attention)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int


# The values of segment_anything.build_sam's build_sam_vit_{b,l,h}.
OFFICIAL_ENCODERS: dict[str, EncoderSpec] = {
    "vit_b": EncoderSpec(768, 12, 12, (2, 5, 8, 11), OFFICIAL_WINDOW_SIZE),
    "vit_l": EncoderSpec(1024, 24, 16, (5, 11, 17, 23), OFFICIAL_WINDOW_SIZE),
    "vit_h": EncoderSpec(1280, 32, 16, (7, 15, 23, 31), OFFICIAL_WINDOW_SIZE),
}


# ---------------------------------------------------------------- construction
def encoder_spec(config: SamConfig) -> EncoderSpec:
    """The image-encoder hyper-parameters of the configured variant."""
    if config.variant in OFFICIAL_ENCODERS:
        return OFFICIAL_ENCODERS[config.variant]
    small = config.small
    spec = EncoderSpec(
        small.embed_dim,
        small.depth,
        small.num_heads,
        tuple(small.global_attn_indexes),
        small.window_size,
    )
    return spec


def _image_encoder(spec: EncoderSpec, image_size: int) -> ImageEncoderViT:
    return ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=PROMPT_EMBED_DIM,
    )


def _prompt_encoder(image_size: int) -> PromptEncoder:
    grid = image_size // PATCH_SIZE
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def _mask_decoder() -> MaskDecoder:
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


def build_sam(config: SamConfig) -> Sam:
    """SAM of the configured variant and image size; loads config.checkpoint when set.

    Like segment_anything's builders the model is returned in eval mode; training switches it.
    """
    sam = Sam(
        image_encoder=_image_encoder(encoder_spec(config), config.image_size),
        prompt_encoder=_prompt_encoder(config.image_size),
        mask_decoder=_mask_decoder(),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if config.checkpoint is not None:
        load_sam_checkpoint(sam, config.checkpoint)
    return sam


def describe_architecture(model: Sam) -> str:
    """'vit_b' etc. for an official encoder, else 'small (embed E, depth D)': for messages."""
    encoder = model.image_encoder
    embed_dim, depth = encoder.patch_embed.proj.out_channels, len(encoder.blocks)
    for name, spec in OFFICIAL_ENCODERS.items():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return name
    return f"small (embed {embed_dim}, depth {depth})"


# ---------------------------------------------------------------- checkpoint file
def has_official_name(path: Path) -> bool:
    """True for names of the official form (sam_vit_b_01ec64.pth), whose hash is checked on load."""
    return _HASH_SUFFIX.search(Path(path).stem) is not None


def _check_hash(path: Path) -> tuple[str, str]:
    """(sha256, 'verified' | 'unverified'); InputError when the name's hash prefix disagrees."""
    sha256 = file_sha256(path)
    match = _HASH_SUFFIX.search(path.stem)
    if match is None:
        return sha256, "unverified"
    expected = match.group(1).lower()
    if not sha256.startswith(expected):
        raise InputError(
            path,
            f"sha256 {sha256[:12]}... does not start with '{expected}' from the file name: "
            "corrupt or wrong download",
            "download the official checkpoint again "
            "(or rename the file if its suffix is not a hash)",
        )
    return sha256, "verified"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict; InputError if torch cannot load it or it is not a state dict."""
    loaded = load_torch_file(path, "give the .pth state dict file of a SAM checkpoint", mmap=True)
    if not isinstance(loaded, dict):
        _refuse_wrapped(path, f"holds a {type(loaded).__name__}")
    wrappers = [str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    if wrappers:
        _refuse_wrapped(path, f"entries {listed(wrappers)} are not tensors")
    return loaded


def _refuse_wrapped(path: Path, what: str) -> NoReturn:
    # Training scripts often save {"model": state_dict, "epoch": ...}: say which key to extract.
    raise InputError(
        path,
        f"not a plain state dict of tensors: {what}",
        "save model.state_dict() itself (official SAM checkpoints are plain state dicts)",
    )


# ---------------------------------------------------------------- fitting to the model
def _check_keys(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Strict key match, checked here so the message names keys, counts and the architecture."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing or unexpected:
        raise InputError(
            path,
            f"checkpoint does not fit sam {arch}: {len(missing)} missing {listed(missing)}, "
            f"{len(unexpected)} unexpected {listed(unexpected)}",
            "set sam.variant to the checkpoint's variant (sam_vit_b_*.pth is vit_b, and so on)",
        )


def _is_rel_pos(key: str) -> bool:
    return key.startswith("image_encoder.") and key.endswith(_REL_POS_SUFFIXES)


def _resizable(key: str, source: torch.Size, target: torch.Size) -> bool:
    """Only the size-dependent position tables may differ, and only along their spatial dims."""
    if key == POS_EMBED_KEY:
        return len(source) == len(target) == 4 and (source[0], source[3]) == (target[0], target[3])
    if _is_rel_pos(key):
        return len(source) == len(target) == 2 and source[1] == target[1]
    return False


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, C) absolute position embedding, bicubic to (1, h, w, C) as in SAMed/MedSAM."""
    channels_first = pos_embed.float().permute(0, 3, 1, 2)
    resized = F.interpolate(channels_first, size=grid, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(2*size-1, head_dim) relative position table, linear along dim 0 to the new length."""
    resized = F.interpolate(table.float().T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype).contiguous()


def _resize(key: str, tensor: torch.Tensor, target: torch.Size) -> torch.Tensor:
    if key == POS_EMBED_KEY:
        return resize_pos_embed(tensor, (target[1], target[2]))
    return resize_rel_pos(tensor, target[0])


def _fit_shapes(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The state dict with position tables resized to the model's image size, and what changed."""
    fitted: dict[str, torch.Tensor] = {}
    resized: list[dict[str, Any]] = []
    for key, tensor in found.items():
        target = expected[key].shape
        if tensor.shape == target:
            fitted[key] = tensor
        elif _resizable(key, tensor.shape, target):
            fitted[key] = _resize(key, tensor, target)
            resized.append({"key": key, "from": list(tensor.shape), "to": list(target)})
        else:
            raise InputError(
                path,
                f"{key} has shape {tuple(tensor.shape)} in the checkpoint "
                f"but {tuple(target)} in the model",
                "set sam.variant to the checkpoint's variant",
            )
    return fitted, resized


def load_sam_checkpoint(model: Sam, path: Path, *, verify_hash: bool = True) -> dict[str, Any]:
    """Load a SAM state dict into `model`, resizing position tables to its image size.

    Returns {path, sha256, hash_status ('verified' | 'unverified' | 'skipped'), variant_hash_ok
    (True only when verified), resized: [{key, from, to}]}; sha256 is None when skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "checkpoint file not found", "set sam.checkpoint to an existing .pth file"
        )
    sha256, hash_status = _check_hash(path) if verify_hash else (None, "skipped")
    found = _read_state_dict(path)
    expected = model.state_dict()
    _check_keys(expected, found, path, describe_architecture(model))
    fitted, resized = _fit_shapes(expected, found, path)
    model.load_state_dict(fitted, strict=True)
    return {
        "path": str(path),
        "sha256": sha256,
        "hash_status": hash_status,
        "variant_hash_ok": hash_status == "verified",
        "resized": resized,
    }
