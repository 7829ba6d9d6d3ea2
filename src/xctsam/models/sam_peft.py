"""PEFT-SAM: Segment Anything with Conv-LoRA in its image encoder and a prompt-free decoder.

`PromptFreeSam` is one segment_anything `Sam` (from `build_sam`, so official checkpoints load)
with Conv-LoRA on every encoder block's qkv (`inject_conv_lora`); everything else in the image
and prompt encoders is frozen. `Sam.forward` runs under no_grad, so the parts are called here:

    tile (B, 1, h, w) in [0, 1]
      -> bilinear to image_size^2, x255, grey to 3 channels, SAM's pixel mean/std
      -> image encoder (gradients flow into the adapters)
      -> mask decoder with the prompt encoder's no-prompt embeddings; all B images in one
         call: with no prompt the token batch is 1, so the decoder's repeat_interleave is a
         no-op and its transformer broadcasts the tokens over the B images (checked equal to
         one call per image, and ~2x faster with backward on CPU at batch 4-8)
      -> the first `masks` mask tokens' low-res logits (image_size / 4), bilinear to (h, w)
      -> with sam.refine, a full-resolution head over (logits, tile) adds what the quarter-size
         decoder blurs away (models/refine.py)

The mask decoder trains, except the parts no output uses (they would be trainable tensors that
nothing trains): the IoU head, and the hypernetwork MLPs of mask tokens beyond `masks`.

Two layouts (params `sam.layout`):
- multiclass (`PeftSam`): SAM's decoder has 4 mask tokens (1 single-mask + 3 multimask); all 4
  serve as the logits of background, material, pore, inclusion. Softmax, class-weighted CE +
  Dice, argmax.
- per_class (`PerClassPeftSam`), the study's layout: three independent binary models
  (material, pore, inclusion), each its own frozen SAM copy, adapters and decoder, using SAM's
  single-mask token. Targets overlap as in the study's masks: material = the part with its
  defects (labels >= 1), pore = 2, inclusion = 3. Labels are painted material -> pore ->
  inclusion (a later class overwrites an earlier one).
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.config.sam import ConvLoraConfig, SamConfig
from xctsam.models.base import MulticlassSegmenter, Segmenter
from xctsam.models.conv_lora import ConvLoRAQKV, collect_balance_loss, inject_conv_lora
from xctsam.models.losses import binary_segmentation_loss, paint_labels
from xctsam.models.refine import refine_head
from xctsam.models.sam_builder import Sam, build_sam

PIXEL_RANGE = 255.0  # SAM's normalisation expects 0..255 RGB
PER_CLASS_ORDER: tuple[str, ...] = CLASS_NAMES[1:]  # painting order: material, pore, inclusion

# ---------------------------------------------------------------- one adapted SAM
def sam_input(sam: Sam, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) grey in [0, 1] -> SAM's normalised (B, 3, S, S) input, S = its image size.
    The grey tile fills SAM's three colour channels; (B, 3, h, w), three adjacent slices
    (`sam.context: 3`), gives each its own channel instead.

    Shared by PEFT-SAM and the promptable (pretraining, zero-shot) uses of one `Sam`, so every
    path feeds the encoder the same way.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1, H, W) grey tiles or (B, 3, H, W) slice triplets, got shape {tuple(images.shape)}")
    size = (sam.image_encoder.img_size, sam.image_encoder.img_size)
    if images.shape[-2:] != size:
        # a square resize fills SAM's whole input, so SAM's bottom-right padding is not needed
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    rgb = (images * PIXEL_RANGE).expand(-1, 3, -1, -1)  # a no-op on three slices
    return (rgb - sam.pixel_mean) / sam.pixel_std


class PromptFreeSam(nn.Module):
    """Conv-LoRA SAM without prompts: (B, 1, h, w) in [0, 1] -> (B, masks, h, w) mask logits."""

    def __init__(self, sam: Sam, lora: ConvLoraConfig, masks: int) -> None:
        super().__init__()
        tokens = sam.mask_decoder.num_mask_tokens
        if not 1 <= masks <= tokens:
            raise ValueError(f"masks: {masks} outside 1..{tokens} (the decoder's mask tokens)")
        self.sam = sam.requires_grad_(False)
        self.masks = masks
        self.balance_reduction = lora.balance_reduction
        self.adapters: list[ConvLoRAQKV] = inject_conv_lora(sam.image_encoder, lora)
        _make_decoder_trainable(sam, masks)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) in [0, 1] -> SAM's normalised (B, 3, S, S) input, S = image_size."""
        return sam_input(self.sam, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        embeddings = self.sam.image_encoder(self.preprocess(images))
        prompt_encoder = self.sam.prompt_encoder
        sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
        low_res, _ = self.sam.mask_decoder.predict_masks(
            image_embeddings=embeddings,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        logits = low_res[:, : self.masks]
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def balance_loss(self) -> torch.Tensor:
        """The encoder blocks' Conv-LoRA balance losses of the last forward, mean or sum over
        blocks (params `sam.lora.balance_reduction`)."""
        return collect_balance_loss(self.adapters, self.balance_reduction)


def _make_decoder_trainable(sam: Sam, masks: int) -> None:
    decoder = sam.mask_decoder
    decoder.requires_grad_(True)
    decoder.iou_prediction_head.requires_grad_(False)
    for unused in decoder.output_hypernetworks_mlps[masks:]:
        unused.requires_grad_(False)


# ---------------------------------------------------------------- the two layouts
class _ConvLoraSegmenter(Segmenter):
    """Loss settings and the balance loss shared by both layouts."""

    def __init__(
        self, config: SamConfig, class_weights: Sequence[float], dice_weight: float
    ) -> None:
        super().__init__()
        self.context = config.context
        if len(class_weights) != NUM_CLASSES:
            raise ValueError(
                f"class_weights: {len(class_weights)} values for {NUM_CLASSES} classes"
            )
        self.dice_weight = float(dice_weight)
        self.balance_weight = config.lora.balance_weight
        # not persistent: the weights are a training choice a checkpoint should not fix
        self.register_buffer(
            "class_weights", torch.as_tensor(class_weights, dtype=torch.float32), persistent=False
        )

    @abstractmethod
    def networks(self) -> list[PromptFreeSam]:
        """The adapted SAMs whose balance losses make up the auxiliary loss."""

    def auxiliary_loss(self) -> torch.Tensor:
        """balance_weight x the Conv-LoRA balance loss of the last forward (summed over networks)."""
        return (
            self.balance_weight * torch.stack([net.balance_loss() for net in self.networks()]).sum()
        )


class PeftSam(_ConvLoraSegmenter, MulticlassSegmenter):
    """Multiclass layout: SAM's 4 mask tokens are the 4 class logits (softmax)."""

    def __init__(
        self,
        config: SamConfig,
        class_weights: Sequence[float] = (1.0,) * NUM_CLASSES,
        dice_weight: float = 1.0,
        sam: Sam | None = None,
    ) -> None:
        super().__init__(config, class_weights, dice_weight)
        self.network = PromptFreeSam(
            sam if sam is not None else build_sam(config), config.lora, NUM_CLASSES
        )
        self.refine = refine_head(NUM_CLASSES, config.context, config.refine)

    def networks(self) -> list[PromptFreeSam]:
        return [self.network]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.network(images)
        return logits if self.refine is None else self.refine(logits, images)


class PerClassPeftSam(_ConvLoraSegmenter):
    """The study's layout: one binary SAM per class; outputs (B, 3, H, W) logits in PER_CLASS_ORDER.

    probabilities() gives (B, 4, H, W) = (1 - p_material, p_material, p_pore, p_inclusion): each
    channel is one head's own sigmoid (channel 0 only completes the shape), so blending tiles
    channel by channel and then painting equals painting the blended per-class probabilities.
    """

    labelling = "paint"

    def __init__(
        self,
        config: SamConfig,
        class_weights: Sequence[float] = (1.0,) * NUM_CLASSES,
        dice_weight: float = 1.0,
        sam: Sam | None = None,
    ) -> None:
        super().__init__(config, class_weights, dice_weight)
        base = sam if sam is not None else build_sam(config)  # built (and checkpoint read) once
        # copied before any adapter goes in: every head starts from the same pristine SAM
        copies = [base] + [copy.deepcopy(base) for _ in PER_CLASS_ORDER[1:]]
        self.heads = nn.ModuleDict(
            {
                name: PromptFreeSam(copy_, config.lora, masks=1)
                for name, copy_ in zip(PER_CLASS_ORDER, copies)
            }
        )
        self.refine = refine_head(len(PER_CLASS_ORDER), config.context, config.refine)

    def networks(self) -> list[PromptFreeSam]:
        return list(self.heads.values())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([head(images) for head in self.heads.values()], dim=1)
        return logits if self.refine is None else self.refine(logits, images)

    @staticmethod
    def binary_targets(labels: torch.Tensor) -> torch.Tensor:
        """(B, H, W) labels -> (B, 3, H, W) overlapping masks: material (>= 1), pore, inclusion."""
        material = labels >= CLASS_NAMES.index("material")
        pore = labels == CLASS_NAMES.index("pore")
        inclusion = labels == CLASS_NAMES.index("inclusion")
        return torch.stack([material, pore, inclusion], dim=1).float()

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the heads' own BCE + Dice losses (each head trained as if alone).

        A head's positive term is weighted by its class's weight (pos_weight), the binary
        counterpart of the multiclass layout's class-weighted cross-entropy.
        """
        targets = self.binary_targets(labels)
        positive_weights = self.class_weights[1:]
        head_losses = [
            binary_segmentation_loss(
                outputs[:, channel : channel + 1],
                targets[:, channel : channel + 1],
                self.dice_weight,
                pos_weight=positive_weights[channel : channel + 1],
            )
            for channel in range(len(PER_CLASS_ORDER))
        ]
        return torch.stack(head_losses).sum()

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        per_class = outputs.float().sigmoid()
        return torch.cat([1 - per_class[:, :1], per_class], dim=1)

    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Background, then each class painted over the previous where its probability > 0.5."""
        return paint_labels(probabilities)


def build_peft_sam(
    config: SamConfig,
    class_weights: Sequence[float] = (1.0,) * NUM_CLASSES,
    dice_weight: float = 1.0,
) -> PeftSam | PerClassPeftSam:
    """The PEFT-SAM of the configured layout (sam.layout), in training-ready state."""
    layout = PerClassPeftSam if config.layout == "per_class" else PeftSam
    return layout(config, class_weights, dice_weight)
