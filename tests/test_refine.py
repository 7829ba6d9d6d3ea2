"""The full-resolution refinement head (`sam.refine`, `unet.refine`)."""

from __future__ import annotations

import torch

from xctsam.config.refine import RefineConfig
from xctsam.config.unet import UNetConfig
from xctsam.models.refine import RefineHead, refine_head
from xctsam.models.unet25d import UNet25D


def test_a_new_head_is_the_identity_and_learns_from_the_grey_level() -> None:
    torch.manual_seed(0)
    head = RefineHead(classes=2, image_channels=1, config=RefineConfig(channels=8, layers=2))
    logits = torch.randn(4, 2, 16, 16)
    images = torch.rand(4, 1, 16, 16)
    assert torch.equal(head(logits, images), logits)  # zero-initialised output

    # flat logits carry nothing: the class is the grey level alone (dark 0, bright 1), which a
    # GroupNorm network loses on uniform tiles and this head, without a norm, can learn
    level = torch.rand(64, 1, 1, 1).expand(64, 1, 16, 16).contiguous()
    target = (level[:, 0] > 0.5).long()
    flat = torch.zeros(64, 2, 16, 16)
    optimiser = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(150):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(flat, level), target)
        loss.backward()
        optimiser.step()
    accuracy = (head(flat, level).argmax(1) == target).float().mean()
    assert accuracy > 0.95


def test_no_channels_no_head_and_the_unet_unchanged() -> None:
    assert refine_head(4, 1, RefineConfig()) is None
    torch.manual_seed(0)
    plain = UNet25D(UNetConfig(context=3, filters=4, depth=2))
    torch.manual_seed(0)
    refined = UNet25D(UNetConfig(context=3, filters=4, depth=2, refine=RefineConfig(channels=4)))
    images = torch.rand(2, 3, 24, 24)
    assert plain.refine is None and refined.refine is not None
    # the head draws its weights after the network's: same network weights, identity head
    torch.testing.assert_close(refined(images), plain(images))
    assert set(plain.state_dict()) < set(refined.state_dict())


def test_sam_layouts_take_the_head_and_train_it() -> None:
    from tests.test_sam_peft import TINY
    from xctsam.config.sam import SamConfig
    from xctsam.models.sam_peft import build_peft_sam

    for layout, channels in (("multiclass", 4), ("per_class", 3)):
        torch.manual_seed(0)
        model = build_peft_sam(SamConfig(small=TINY, layout=layout, refine=RefineConfig(channels=4)))
        images = torch.rand(2, 1, 32, 32)
        outputs = model(images)
        assert outputs.shape == (2, channels, 32, 32)
        model.loss(outputs, torch.randint(0, 4, (2, 32, 32))).backward()
        assert model.refine.net[-1].weight.grad is not None and model.refine.net[-1].weight.grad.abs().sum() > 0


def test_batch_norm_unet_keeps_a_uniform_tiles_grey_level() -> None:
    """GroupNorm maps a uniform dark tile and a uniform bright one to (nearly) the same outputs;
    with BatchNorm's running statistics (eval mode) they stay apart."""
    dark, bright = torch.full((1, 3, 48, 48), 0.2), torch.full((1, 3, 48, 48), 0.8)
    differences = {}
    for norm in ("group", "batch"):
        torch.manual_seed(0)
        model = UNet25D(UNetConfig(context=3, filters=4, depth=2, norm=norm))
        model.train()
        model(torch.rand(4, 3, 48, 48))  # one training-mode pass fills the running statistics
        model.eval()
        with torch.no_grad():  # the centre, away from the zero padding's edge effects
            differences[norm] = float((model(dark) - model(bright))[..., 16:32, 16:32].abs().max())
    assert differences["group"] < 1e-3 < differences["batch"], differences
