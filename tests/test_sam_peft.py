"""PEFT-SAM on a tiny encoder (embed 32, depth 2) at SAM's smallest image size (256).

Tiles of 32-48 px are resized to 256 inside the model; the mask decoder is SAM's own (256-d).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xctsam import NUM_CLASSES
from xctsam.config.sam import ConvLoraConfig, SamConfig, SmallSamConfig
from xctsam.models.base import trainable_parameters
from xctsam.models.conv_lora import ConvLoRAQKV
from xctsam.models.sam_peft import (
    PER_CLASS_ORDER,
    PeftSam,
    PerClassPeftSam,
    build_peft_sam,
)

TINY = SmallSamConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=8)
ADAPTER_PARTS = (".attn.qkv.lora_a.", ".attn.qkv.lora_b.", ".attn.qkv.mixture.")


def _config(layout: str = "multiclass", **lora: object) -> SamConfig:
    settings = {"rank": 2, "alpha": 2.0, "experts": 3, "top_k": 1, "balance_weight": 0.01, **lora}
    return SamConfig(small=TINY, image_size=256, lora=ConvLoraConfig(**settings), layout=layout)


def _model(layout: str = "multiclass", seed: int = 0, **lora: object) -> PeftSam | PerClassPeftSam:
    torch.manual_seed(seed)
    return build_peft_sam(
        _config(layout, **lora), class_weights=(1.0, 1.0, 3.0, 3.0), dice_weight=1.0
    )


def _randomise_lora_b(model: nn.Module) -> None:
    # B starts at zero, which blocks every gradient upstream of it: open the path
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ConvLoRAQKV):
                module.lora_b.weight.normal_(std=0.1)


def _disc_task(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright discs (material) holding a dark pore, on a dark background, with noise."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for _ in range(batch):
        cy, cx = (torch.rand(2, generator=generator) * size * 0.4 + size * 0.3).tolist()
        distance = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        label = torch.zeros(size, size, dtype=torch.long)
        label[distance < size * 0.3] = 1
        label[distance < size * 0.08] = 2
        image = torch.tensor([0.1, 0.8, 0.3, 0.6])[label] + 0.03 * torch.randn(
            size, size, generator=generator
        )
        images.append(image.clamp(0, 1))
        labels.append(label)
    return torch.stack(images)[:, None], torch.stack(labels)


# ---------------------------------------------------------------- shapes and batching
def test_multiclass_forward_gives_one_logit_map_per_class_at_the_input_size() -> None:
    model = _model().train()
    outputs = model(torch.rand(2, 1, 40, 56))
    assert outputs.shape == (2, NUM_CLASSES, 40, 56)
    probabilities = model.probabilities(outputs)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(2, 40, 56), atol=1e-5)
    assert model.to_labels(probabilities).shape == (2, 40, 56)


def test_one_decoder_call_for_the_batch_equals_one_call_per_image() -> None:
    model = _model().eval()  # no gate noise: routing is deterministic per image
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        batched = model(images)
        one_by_one = torch.cat([model(image[None]) for image in images])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # the images do differ


def test_preprocess_resizes_scales_to_255_and_applies_sam_normalisation() -> None:
    network = _model().network
    grey = torch.full((1, 1, 32, 32), 0.5)
    prepared = network.preprocess(grey)
    assert prepared.shape == (1, 3, 256, 256)
    mean, std = network.sam.pixel_mean.flatten(), network.sam.pixel_std.flatten()
    for channel in range(3):
        expected = (0.5 * 255 - mean[channel]) / std[channel]
        assert torch.allclose(prepared[0, channel], expected.expand(256, 256))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        network.preprocess(torch.rand(1, 2, 32, 32))  # neither a grey tile nor a slice triplet


# ---------------------------------------------------------------- what trains
def _expected_trainable(name: str, masks: int) -> bool:
    if "image_encoder." in name:
        return any(part in name for part in ADAPTER_PARTS)
    if "mask_decoder." not in name or "iou_prediction_head." in name:
        return False
    if "output_hypernetworks_mlps." in name:
        return int(name.split("output_hypernetworks_mlps.")[1].split(".")[0]) < masks
    return True


@pytest.mark.parametrize(("layout", "masks"), [("multiclass", NUM_CLASSES), ("per_class", 1)])
def test_only_adapters_and_decoder_require_grad(layout: str, masks: int) -> None:
    model = _model(layout)
    names = dict(model.named_parameters())
    trainable = {name for name, parameter in names.items() if parameter.requires_grad}
    assert trainable == {name for name in names if _expected_trainable(name, masks)}
    assert any(".mixture.gate." in name for name in trainable)
    assert not any("prompt_encoder." in name for name in trainable)


def test_trainable_parameter_report() -> None:
    model = _model()
    report = trainable_parameters(model)
    parameters = list(model.parameters())
    assert report["total"] == sum(p.numel() for p in parameters)
    assert report["trainable"] == sum(p.numel() for p in parameters if p.requires_grad)
    assert report["share"] == pytest.approx(report["trainable"] / report["total"])
    # per block: A, B, 3 experts, gate and noise maps (embed 32, rank 2); plus the decoder's share
    d, r, experts = TINY.embed_dim, 2, 3
    adapters = TINY.depth * (d * r + r * 3 * d + experts * (9 * r * r + r) + 2 * r * experts)
    decoder = model.network.sam.mask_decoder
    decoder_trainable = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
    assert report["trainable"] == adapters + decoder_trainable


@pytest.mark.parametrize("layout", ["multiclass", "per_class"])
def test_gradient_reaches_every_trainable_tensor(layout: str) -> None:
    model = _model(layout, top_k=3).train()  # every expert chosen, so every expert must learn
    _randomise_lora_b(model)
    images, labels = _disc_task()
    (model.loss(model(images), labels) + model.auxiliary_loss()).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("gate_scales_output", [True, False])
def test_gate_gradient_from_the_task_loss_alone(gate_scales_output: bool) -> None:
    model = _model(gate_scales_output=gate_scales_output, balance_weight=0.0).train()
    _randomise_lora_b(model)
    images, labels = _disc_task()
    (model.loss(model(images), labels) + model.auxiliary_loss()).backward()
    gates = [a.mixture.gate.weight.grad for a in model.network.adapters]
    reached = [g is not None and bool(g.abs().sum() > 0) for g in gates]
    assert reached == [gate_scales_output] * TINY.depth


def test_auxiliary_loss_is_the_weighted_mean_block_balance_loss() -> None:
    model = _model(balance_weight=0.25).train()
    model(torch.rand(2, 1, 32, 32))
    blocks = [float(a.mixture.last_balance_loss.detach()) for a in model.network.adapters]
    assert float(model.auxiliary_loss().detach()) == pytest.approx(0.25 * sum(blocks) / len(blocks))
    assert any(value > 0 for value in blocks)


# ---------------------------------------------------------------- it learns
@pytest.mark.parametrize(("layout", "steps"), [("multiclass", 5), ("per_class", 3)])
def test_a_few_steps_reduce_the_loss_on_a_disc_task(layout: str, steps: int) -> None:
    model = _model(layout).train()
    images, labels = _disc_task(batch=2)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> float:
        loss = model.loss(model(images), labels) + model.auxiliary_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    first = step()
    for _ in range(steps - 1):
        last = step()
    assert last < 0.7 * first


# ---------------------------------------------------------------- the per-class layout
def test_per_class_heads_are_independent_binary_models() -> None:
    model = _model("per_class")
    assert list(model.heads) == list(PER_CLASS_ORDER) == ["material", "pore", "inclusion"]
    owned = [{id(p) for p in head.parameters()} for head in model.heads.values()]
    assert all(not (a & b) for i, a in enumerate(owned) for b in owned[i + 1 :])
    outputs = model.train()(torch.rand(2, 1, 32, 32))
    assert outputs.shape == (2, 3, 32, 32)
    probabilities = model.probabilities(outputs)
    assert probabilities.shape == (2, NUM_CLASSES, 32, 32)
    assert torch.allclose(probabilities[:, 1:], outputs.sigmoid())
    assert torch.allclose(probabilities[:, 0], 1 - probabilities[:, 1])


def test_per_class_targets_overlap_like_the_study_masks() -> None:
    labels = torch.tensor([[[0, 1, 2, 3]]])
    targets = PerClassPeftSam.binary_targets(labels)
    assert targets[0, :, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_per_class_painting_order_inclusion_over_pore_over_material() -> None:
    # pixels: nothing, material, material+pore, all three, pore+inclusion without material,
    # pore alone, material at exactly the threshold (not painted)
    material = [0.1, 0.9, 0.9, 0.9, 0.2, 0.1, 0.5]
    pore = [0.1, 0.2, 0.8, 0.8, 0.7, 0.6, 0.1]
    inclusion = [0.1, 0.3, 0.4, 0.7, 0.9, 0.1, 0.1]
    scores = torch.tensor([[1 - m for m in material], material, pore, inclusion])[None, :, None, :]
    labels = _model("per_class").to_labels(scores)
    assert labels[0, 0].tolist() == [0, 1, 2, 3, 3, 2, 0]


def test_per_class_loss_sums_the_three_heads() -> None:
    model = _model("per_class")
    images, labels = _disc_task()
    with torch.no_grad():
        outputs = model(images)
        whole = model.loss(outputs, labels)
        # a perfect pore head (huge logits of the right sign) removes exactly its own share
        perfect = outputs.clone()
        perfect[:, 1] = 50.0 * (2 * PerClassPeftSam.binary_targets(labels)[:, 1] - 1)
        without_pore = model.loss(perfect, labels)
    assert 0 < float(without_pore) < float(whole)
    assert math.isfinite(float(whole))


def test_three_slice_context_fills_sams_colour_channels() -> None:
    """sam.context 3: adjacent slices as SAM's three channels; three copies of one slice give
    exactly the one-slice model's output (that model fills all three channels with the grey)."""
    from xctsam.config.sam import SamConfig

    torch.manual_seed(0)
    one = build_peft_sam(SamConfig(small=TINY, context=1))
    torch.manual_seed(0)
    three = build_peft_sam(SamConfig(small=TINY, context=3))
    assert (one.context, three.context) == (1, 3)
    three.load_state_dict(one.state_dict())
    one.eval(), three.eval()
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(three(grey.expand(-1, 3, -1, -1)), one(grey))
        assert not torch.allclose(three(torch.rand(2, 3, 32, 32)), one(grey))
