"""Conv-LoRA: LoRA whose low-rank bottleneck runs through a mixture of convolution experts.

After Zhong et al., "Convolution Meets LoRA" (ICLR 2024), as used by the SAM-for-XCT study
(Tabassum and Ziabari, arXiv 2412.11381). A frozen linear layer W of SAM's image encoder (the
fused qkv projection of every block) becomes

    y = W x + (alpha / r) * B (z + MoE(z)),        z = A x  (the rank-r bottleneck)

- A (dim -> r, no bias) and B (r -> out, no bias, zero-initialised, so the adapted encoder
  starts out exactly as the frozen one). Neither has a bias so that zero tokens (the padding of
  SAM's windowed attention) stay zero in the bottleneck.
- z is laid out on its token grid (SAM's Attention hands its qkv a (N, H, W, C) grid: images,
  or windows of them), and MoE(z) is added residually. Expert i (1-based) works at scale i:
  resize up by i, 3x3 conv r -> r (with bias), GELU, resize back to H x W. Larger scales see
  finer detail of the bottleneck: the convolution injects the local image prior plain ViT
  attention lacks. `interpolation`: bilinear up and area down (default; area averages each
  i x i cell, so the way down does not alias), or bicubic both ways as AutoGluon does.
- A gate on the spatially pooled bottleneck picks the top-k experts per sample (per window in
  windowed blocks): noisy top-k gating (Shazeer et al. 2017), Gaussian noise with a learned
  std (softplus of a second linear map, times `gate_noise`) during training only. Gate and
  noise maps are linear r -> E without bias, zero-initialised as in the reference
  implementation (uniform routing at the start).
- Gate values are the softmax over *all* E (noisy) logits, kept for the chosen k and not
  renormalised (as in the Switch Transformer). Shazeer's softmax over the kept k would make a
  top-1 gate value constantly 1 and so carry no gradient at all, whatever the option below.
- `gate_scales_output`: True multiplies each chosen expert's output by its gate value, so the
  segmentation loss trains the gate too. False adds the chosen experts' outputs unweighted, as
  the reference implementation does; the gate then learns only from the balance loss.
- Load-balancing loss: cv^2(importance) + cv^2(load), importance = the batch sum of each
  expert's gate values, load = the number of samples routed to each expert, or Shazeer's smooth
  estimate of it (probability of being in the top k under the noise) when noise is on and
  k < E. It is stored on each mixture after its forward and gathered by `collect_balance_loss`:
  the mean over blocks by default, or the sum as AutoGluon's SAM encoder does
  (`balance_reduction`; depth x the mean, e.g. 12x on vit_b).

configs/conv-lora-reference.yaml sets AutoGluon's choices (models/conv_lora/ of
autogluon.multimodal, the study's code): bicubic, alpha 32, summed balance loss, 8 experts,
top-1, ungated. What it still does not reproduce: AutoGluon's gate values are the softmax over
the kept k (constantly 1 at top-1, so its importance term counts samples), and its expert conv
biases start at zero.

Trainable parameters per adapted layer (dim d in, 3d out, rank r, E experts):
    d*r (A) + 3d*r (B) + E*(9r^2 + r) (experts) + r*E (gate) + r*E (noise; only if gate_noise > 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xctsam.config.sam import ConvLoraConfig

NOISE_FLOOR = 1e-2  # Shazeer et al.'s noise epsilon: the std never collapses to exactly 0
_CV_EPS = 1e-10
# params `sam.lora.interpolation` -> (mode up, mode down) of F.interpolate
RESIZE_MODES: dict[str, tuple[str, str]] = {
    "bilinear_area": ("bilinear", "area"),
    "bicubic": ("bicubic", "bicubic"),
}


def _resize(grid: torch.Tensor, mode: str, **size_or_scale: object) -> torch.Tensor:
    # align_corners exists only for the interpolating modes; False is also their default
    corners = None if mode == "area" else False
    return F.interpolate(grid, mode=mode, align_corners=corners, **size_or_scale)


# ---------------------------------------------------------------- experts
class ScaledConvExpert(nn.Module):
    """Resize up by `scale`, 3x3 conv, GELU, resize back (modes: RESIZE_MODES[interpolation])."""

    def __init__(self, channels: int, scale: int, interpolation: str = "bilinear_area") -> None:
        super().__init__()
        self.scale = scale
        # bilinear_area: area = the mean of each scale x scale cell, where bilinear down by an
        # integer factor would sample single pixels and alias; bicubic: AutoGluon's choice
        self.up_mode, self.down_mode = RESIZE_MODES[interpolation]
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, r, H, W) -> (N, r, H, W)."""
        if self.scale == 1:
            return F.gelu(self.conv(grid))
        size = grid.shape[-2:]
        upsampled = _resize(grid, self.up_mode, scale_factor=self.scale)
        return _resize(F.gelu(self.conv(upsampled)), self.down_mode, size=size)


# ---------------------------------------------------------------- gating
class Routing(NamedTuple):
    gates: torch.Tensor  # (N, E) gate values of the chosen experts, 0 elsewhere
    routed: torch.Tensor  # (N, E) bool: expert chosen for the sample
    load: torch.Tensor  # (E,) samples per expert (smooth estimate when differentiable)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2); 0 for a single value."""
    values = values.float()
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + _CV_EPS)


def balance_loss(gates: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """cv^2 of the per-expert importance (summed gate values) plus cv^2 of the per-expert load."""
    return cv_squared(gates.sum(dim=0)) + cv_squared(load)


def smooth_load(
    clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Shazeer et al.'s differentiable load: per expert, the summed probability of being in the top k.

    For each sample and expert, the probability (over a fresh draw of that expert's noise, the
    other logits held fixed) that its noisy logit beats the k-th best of the others. Needs k < E.
    """
    top_values = noisy.topk(top_k + 1, dim=-1).values
    in_threshold = top_values[:, top_k : top_k + 1]  # what an expert inside the top k must beat
    out_threshold = top_values[:, top_k - 1 : top_k]  # what an expert outside must beat
    is_in = noisy > in_threshold
    prob_if_in = torch.special.ndtr((clean - in_threshold) / noise_std)  # standard normal CDF
    prob_if_out = torch.special.ndtr((clean - out_threshold) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)


class ConvExpertMixture(nn.Module):
    """E scaled conv experts on a rank-r grid, top-k gated on the pooled grid; adds no residual."""

    def __init__(
        self,
        rank: int,
        experts: int,
        top_k: int,
        noise: float,
        gate_scales_output: bool,
        interpolation: str = "bilinear_area",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k: {top_k} must lie in 1..{experts} (the expert count)")
        self.top_k = top_k
        self.noise_level = float(noise)
        self.gate_scales_output = gate_scales_output
        self.experts = nn.ModuleList(
            ScaledConvExpert(rank, scale, interpolation) for scale in range(1, experts + 1)
        )
        self.gate = nn.Linear(rank, experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        # no noise map when noise is off: it would be a trainable tensor nothing trains
        self.noise = nn.Linear(rank, experts, bias=False) if noise > 0 else None
        if self.noise is not None:
            nn.init.zeros_(self.noise.weight)
        self.last_balance_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, pooled: torch.Tensor) -> Routing:
        """(N, r) pooled bottleneck -> which experts each sample uses, and with which gate value."""
        clean = self.gate(pooled)
        noise_std = None
        logits = clean
        if self.training and self.noise is not None:
            noise_std = self.noise_level * (F.softplus(self.noise(pooled)) + NOISE_FLOOR)
            logits = clean + torch.randn_like(clean) * noise_std
        chosen = logits.topk(self.top_k, dim=-1).indices
        routed = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        gates = logits.softmax(dim=-1) * routed
        if noise_std is not None and self.top_k < self.num_experts:
            load = smooth_load(clean, logits, noise_std, self.top_k)
        else:
            load = routed.sum(dim=0).float()
        return Routing(gates, routed, load)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(N, r, H, W) -> the chosen experts' summed (optionally gate-weighted) outputs."""
        routing = self.route(bottleneck.mean(dim=(2, 3)))
        self.last_balance_loss = balance_loss(routing.gates, routing.load)
        weights = routing.gates if self.gate_scales_output else routing.routed.to(bottleneck.dtype)
        if torch.compiler.is_exporting():
            return self._dense(bottleneck, weights)
        # (N, r*H*W) rows: index_add on the 4-D grid took ~30 ms on a (32, 4, 8, 8) tensor on
        # CPU (measured; the 2-D form of the same sum takes microseconds)
        mixed = bottleneck.new_zeros(bottleneck.shape[0], bottleneck[0].numel())
        # each expert runs only on the samples routed to it (sparse dispatch)
        for index, expert in enumerate(self.experts):
            samples = routing.routed[:, index].nonzero().squeeze(1)
            if samples.numel() == 0:
                continue
            output = expert(bottleneck.index_select(0, samples))
            output = output * weights[samples, index].view(-1, 1, 1, 1).to(output.dtype)
            mixed = mixed.index_add(0, samples, output.reshape(len(samples), -1))
        return mixed.view(bottleneck.shape)

    def _dense(self, bottleneck: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every sample, weighted (0 where not routed): the same sum without the
        data-dependent dispatch torch.export (ONNX export) cannot trace; experts are cheap."""
        outputs = [expert(bottleneck) * weights[:, index].view(-1, 1, 1, 1).to(bottleneck.dtype) for index, expert in enumerate(self.experts)]
        return torch.stack(outputs).sum(dim=0)


# ---------------------------------------------------------------- the adapted layer
class ConvLoRAQKV(nn.Module):
    """A frozen nn.Linear (SAM's fused qkv) plus Conv-LoRA; takes the (N, H, W, C) token grid."""

    def __init__(self, base: nn.Linear, config: ConvLoraConfig) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = config.alpha / config.rank
        # A keeps nn.Linear's Kaiming-uniform init, as in LoRA; B starts at zero
        self.lora_a = nn.Linear(base.in_features, config.rank, bias=False)
        self.lora_b = nn.Linear(config.rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.mixture = ConvExpertMixture(
            config.rank,
            config.experts,
            config.top_k,
            config.gate_noise,
            config.gate_scales_output,
            config.interpolation,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 4:
            raise ValueError(
                f"Conv-LoRA needs the (N, H, W, C) token grid of SAM's attention, got shape {tuple(tokens.shape)}"
            )
        bottleneck = self.lora_a(tokens).permute(0, 3, 1, 2)  # (N, r, H, W) for the conv experts
        adapted = (bottleneck + self.mixture(bottleneck)).permute(0, 2, 3, 1)
        # the frozen layer on the flat (M, C) tokens: its output is then a tensor of its own,
        # not a view, so adding B's path into it in place costs autograd no copy
        frozen = self.base(tokens.reshape(-1, tokens.shape[-1]))
        return add_low_rank(frozen, adapted, self.lora_b.weight, self.scale).view(*tokens.shape[:-1], -1)


def add_low_rank(
    frozen: torch.Tensor, adapted: torch.Tensor, weight_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """frozen (M, out) += scale * adapted @ B^T, accumulated into the frozen output in place.

    The plain `frozen + scale * lora_b(adapted)` allocates two output-sized temporaries (B's
    output and its scaled copy) and a third for the sum; on SAM's qkv, (tokens x 3d) is the
    largest tensor of the block, and a fresh one costs its page faults every step. Here the
    scale goes into the (3d x r) weight and B's product is added in place (addmm_), which
    autograd allows: the frozen linear's backward needs its input, not its output. Autograd
    then takes B's gradient as adapted^T @ grad, (r x M)(M x 3d), about 4x faster on CPU BLAS
    than linear's grad^T @ adapted, (3d x M)(M x r). Same values to float rounding.
    """
    rank = adapted.shape[-1]
    scaled_b = (weight_b * scale).t()  # (r, 3d)
    # autocast: the frozen output may be bf16 while the bottleneck is float32
    return frozen.addmm_(adapted.reshape(-1, rank).to(frozen.dtype), scaled_b.to(frozen.dtype))


def inject_conv_lora(image_encoder: nn.Module, config: ConvLoraConfig) -> list[ConvLoRAQKV]:
    """Freeze the whole encoder and wrap every block's `attn.qkv` in Conv-LoRA (trainable).

    `image_encoder` is segment_anything's ImageEncoderViT (anything with `blocks[i].attn.qkv`).
    Returns the adapters in block order, for `collect_balance_loss`.
    """
    image_encoder.requires_grad_(False)
    adapters = []
    for index, block in enumerate(image_encoder.blocks):
        if isinstance(block.attn.qkv, ConvLoRAQKV):
            raise ValueError(f"block {index} already carries Conv-LoRA")
        adapter = ConvLoRAQKV(block.attn.qkv, config)
        block.attn.qkv = adapter
        adapters.append(adapter)
    return adapters


def collect_balance_loss(
    adapters: Sequence[ConvLoRAQKV], reduction: Literal["mean", "sum"] = "mean"
) -> torch.Tensor:
    """Mean (or sum) over the adapters of their last forward's balance loss (0 before any forward).

    The mean, by default, so that `balance_weight` means the same for a 4-block small encoder
    and a 32-block vit_h; the sum is AutoGluon's (params `sam.lora.balance_reduction`).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"balance_reduction: unknown {reduction!r}; expected mean or sum")
    losses = [
        a.mixture.last_balance_loss for a in adapters if a.mixture.last_balance_loss is not None
    ]
    if not losses:
        device = adapters[0].lora_a.weight.device if adapters else None
        return torch.zeros((), device=device)
    stacked = torch.stack(losses)
    return stacked.sum() if reduction == "sum" else stacked.mean()
