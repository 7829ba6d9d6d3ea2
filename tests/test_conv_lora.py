"""Conv-LoRA on tiny shapes: identity at B = 0, parameter counts, gradients, gating, balance loss,
and the AutoGluon reference preset (configs/conv-lora-reference.yaml)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xctsam.config.params import load_params, parse_params
from xctsam.config.sam import ConvLoraConfig, SamConfig, SmallSamConfig
from xctsam.models.conv_lora import (
    ConvExpertMixture,
    ConvLoRAQKV,
    ScaledConvExpert,
    balance_loss,
    collect_balance_loss,
    cv_squared,
    inject_conv_lora,
    smooth_load,
)
from xctsam.models.sam_builder import build_sam
from xctsam.models.sam_peft import PeftSam
from xctsam.params_file import apply_overlay, read_overlay
from xctsam.util.errors import ConfigError

from .conftest import REPO

DIM = 16


def _adapter(seed: int = 0, **lora: object) -> ConvLoRAQKV:
    torch.manual_seed(seed)
    return ConvLoRAQKV(nn.Linear(DIM, 3 * DIM), ConvLoraConfig(**{"rank": 2, "experts": 3, **lora}))


def _tokens(batch: int = 4, size: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, size, size, DIM, generator=torch.Generator().manual_seed(seed))


def _randomise_lora_b(adapter: ConvLoRAQKV) -> None:
    # B starts at zero, which blocks every gradient upstream of it: open the path
    with torch.no_grad():
        adapter.lora_b.weight.normal_()


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- identity at B = 0
def test_zero_b_leaves_the_frozen_layer_output_unchanged() -> None:
    adapter = _adapter().train()  # noisy gating on: must not matter either
    tokens = _tokens()
    assert torch.equal(adapter(tokens), adapter.base(tokens))
    _randomise_lora_b(adapter)
    assert not torch.allclose(adapter(tokens), adapter.base(tokens))


def test_injected_encoder_with_zero_b_matches_the_original() -> None:
    # window 5 on a 16 x 16 grid: windowed blocks pad to 20 and hand 2x2 windows of 5x5 to qkv
    small = SmallSamConfig(
        embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=5
    )
    torch.manual_seed(0)
    encoder = build_sam(SamConfig(small=small)).image_encoder
    original = copy.deepcopy(encoder)
    adapters = inject_conv_lora(encoder, ConvLoraConfig(rank=2, experts=2))
    image = torch.randn(2, 3, 256, 256)
    encoder.train()
    with torch.no_grad():
        assert torch.allclose(encoder(image), original(image), atol=1e-6)
    assert len(adapters) == 2
    assert all(block.attn.qkv is adapter for block, adapter in zip(encoder.blocks, adapters))


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize(
    ("rank", "experts", "gate_noise"),
    [(1, 1, 1.0), (2, 3, 1.0), (4, 4, 1.0), (4, 2, 0.0), (8, 5, 0.5)],
)
def test_parameter_count_follows_the_documented_formula(
    rank: int, experts: int, gate_noise: float
) -> None:
    top_k = 1
    adapter = _adapter(rank=rank, experts=experts, top_k=top_k, gate_noise=gate_noise)
    noise_maps = 1 if gate_noise > 0 else 0
    expected = (
        DIM * rank  # A
        + rank * 3 * DIM  # B
        + experts * (9 * rank * rank + rank)  # 3x3 conv r -> r with bias, per expert
        + rank * experts * (1 + noise_maps)  # gate (and noise) maps, no bias
    )
    counted = sum(p.numel() for p in _trainable(adapter).values())
    assert counted == expected
    frozen = sum(p.numel() for p in adapter.parameters() if not p.requires_grad)
    assert frozen == DIM * 3 * DIM + 3 * DIM  # the wrapped qkv, untouched


def test_rank_and_experts_change_the_count_by_the_formula() -> None:
    def count(rank: int, experts: int) -> int:
        return sum(
            p.numel() for p in _trainable(_adapter(rank=rank, experts=experts, top_k=1)).values()
        )

    # one more expert: one conv (9r^2 + r) plus one column of gate and of noise (2r)
    assert count(3, 4) - count(3, 3) == 9 * 3 * 3 + 3 + 2 * 3
    # rank 2 -> 3 at 3 experts: A and B grow by 4d, each conv by 9(9 - 4) + 1, gate and noise by 2E
    assert count(3, 3) - count(2, 3) == 4 * DIM + 3 * (9 * 5 + 1) + 2 * 3


# ---------------------------------------------------------------- gradients
def test_gradient_reaches_every_trainable_tensor_and_no_frozen_one() -> None:
    adapter = _adapter(experts=3, top_k=3).train()  # every expert chosen: all must learn
    _randomise_lora_b(adapter)
    output = adapter(_tokens())
    (output.square().mean() + adapter.mixture.last_balance_loss).backward()
    for name, parameter in _trainable(adapter).items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in adapter.base.parameters())


@pytest.mark.parametrize("alpha", [2.0, 32.0])
def test_fused_output_and_gradients_equal_the_plain_lora_formula(alpha: float) -> None:
    # the layer adds B's path by one accumulating GEMM with the scale folded into B: it must
    # give what y = W x + b + s * B (z + MoE(z)) written out with separate ops gives
    adapter = _adapter(alpha=alpha).eval()
    _randomise_lora_b(adapter)
    adapter.base.requires_grad_(True)  # also a fully fine-tuned base gets its gradients right
    reference = copy.deepcopy(adapter)
    tokens = _tokens()
    fused_in, plain_in = tokens.clone().requires_grad_(True), tokens.clone().requires_grad_(True)
    fused = adapter(fused_in)

    bottleneck = reference.lora_a(plain_in).permute(0, 3, 1, 2)
    adapted = (bottleneck + reference.mixture(bottleneck)).permute(0, 2, 3, 1)
    plain = reference.base(plain_in) + reference.scale * reference.lora_b(adapted)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)

    upstream = torch.randn_like(fused)
    (fused * upstream).sum().backward()
    (plain * upstream).sum().backward()
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=0, atol=1e-5)
    for (name, got), expected in zip(adapter.named_parameters(), reference.parameters(), strict=True):
        if got.grad is None:
            assert expected.grad is None, name
            continue
        torch.testing.assert_close(got.grad, expected.grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("gate_scales_output", [True, False])
def test_gate_learns_from_the_task_only_when_it_scales_the_output(gate_scales_output: bool) -> None:
    # top-1, the default: a softmax over the kept expert alone would give no gradient either way
    adapter = _adapter(experts=3, top_k=1, gate_scales_output=gate_scales_output).train()
    _randomise_lora_b(adapter)
    adapter(_tokens(batch=8)).square().mean().backward()  # task loss only
    task_gradient = adapter.mixture.gate.weight.grad
    learns_from_task = task_gradient is not None and bool(task_gradient.abs().sum() > 0)
    assert learns_from_task == gate_scales_output

    adapter.zero_grad()
    adapter(_tokens(batch=8))
    adapter.mixture.last_balance_loss.backward()  # the balance loss trains it in both settings
    assert adapter.mixture.gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- balance loss and gating
def test_cv_squared_is_the_unbiased_variance_over_the_squared_mean() -> None:
    values = np.array([1.0, 3.0, 8.0])
    assert float(cv_squared(torch.tensor(values))) == pytest.approx(
        values.var(ddof=1) / values.mean() ** 2
    )
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0


def test_balance_loss_is_zero_for_a_perfectly_balanced_gate() -> None:
    experts = 3
    balanced = 0.7 * torch.eye(experts).repeat(2, 1)  # each expert: two samples, same gate values
    assert float(balance_loss(balanced, balanced.gt(0).sum(0).float())) == pytest.approx(
        0.0, abs=1e-12
    )
    collapsed = torch.zeros(6, experts)
    collapsed[:, 0] = 0.7
    assert float(balance_loss(collapsed, collapsed.gt(0).sum(0).float())) > 1.0


def _one_hot_grid(expert_per_sample: list[int], rank: int) -> torch.Tensor:
    pooled = torch.eye(rank)[expert_per_sample]
    return pooled[:, :, None, None].expand(-1, -1, 4, 4).contiguous()


def test_mixture_balance_loss_from_its_own_routing() -> None:
    experts = rank = 3
    mixture = ConvExpertMixture(rank, experts, top_k=1, noise=1.0, gate_scales_output=True).eval()
    with torch.no_grad():
        mixture.gate.weight.copy_(5 * torch.eye(experts))  # sample pooled to e_i picks expert i
    with torch.no_grad():
        mixture(_one_hot_grid([0, 1, 2, 0, 1, 2], rank))
        assert float(mixture.last_balance_loss) == pytest.approx(0.0, abs=1e-9)
        mixture(_one_hot_grid([0, 0, 0, 0, 1, 2], rank))
    assert float(mixture.last_balance_loss) > 0.5


def test_smooth_load_matches_a_monte_carlo_estimate() -> None:
    generator = torch.Generator().manual_seed(3)
    experts, top_k, draws = 4, 2, 200_000
    clean = torch.randn(1, experts, generator=generator)
    noise_std = 0.5 + torch.rand(1, experts, generator=generator)
    noisy = clean + torch.randn(1, experts, generator=generator) * noise_std
    estimate = smooth_load(clean, noisy, noise_std, top_k)
    # redraw one expert's noise at a time, the others fixed: how often is it in the top k?
    for expert in range(experts):
        others = torch.cat([noisy[0, :expert], noisy[0, expert + 1 :]])
        kth_best_other = others.topk(top_k).values[-1]
        redrawn = clean[0, expert] + torch.randn(draws, generator=generator) * noise_std[0, expert]
        assert float(estimate[expert]) == pytest.approx(
            float((redrawn > kth_best_other).float().mean()), abs=0.01
        )


def test_noise_only_in_training() -> None:
    mixture = ConvExpertMixture(2, 4, top_k=1, noise=1.0, gate_scales_output=True)
    pooled = torch.randn(64, 2)
    mixture.eval()
    assert torch.equal(mixture.route(pooled).routed, mixture.route(pooled).routed)
    mixture.train()  # zero-initialised gate: routing is decided by the noise alone
    assert not torch.equal(mixture.route(pooled).routed, mixture.route(pooled).routed)


def test_expert_i_convolves_at_scale_i_and_returns_the_input_grid() -> None:
    mixture = ConvExpertMixture(2, 3, top_k=3, noise=0.0, gate_scales_output=False)
    seen: list[tuple[int, int]] = []
    for expert in mixture.experts:
        expert.conv.register_forward_hook(
            lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[-2:]))
        )
    output = mixture(torch.randn(2, 2, 5, 7))
    assert seen == [(5, 7), (10, 14), (15, 21)]
    assert output.shape == (2, 2, 5, 7)


def test_unweighted_mixture_is_the_sum_of_the_chosen_experts() -> None:
    mixture = ConvExpertMixture(2, 3, top_k=2, noise=0.0, gate_scales_output=False).eval()
    with torch.no_grad():
        mixture.gate.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]]))
    grid = torch.rand(1, 2, 4, 4) + 0.5  # positive pooled values: experts 0 and 1 win
    expected = mixture.experts[0](grid) + mixture.experts[1](grid)
    assert torch.allclose(mixture(grid), expected, atol=1e-6)


# ---------------------------------------------------------------- injection and collection
def test_inject_freezes_the_rest_and_refuses_a_second_injection() -> None:
    small = SmallSamConfig(
        embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=8
    )
    encoder = build_sam(SamConfig(small=small)).image_encoder
    encoder.requires_grad_(True)
    adapters = inject_conv_lora(encoder, ConvLoraConfig(rank=2, experts=2))
    adapter_names = {
        f"blocks.{i}.attn.qkv.{name}" for i, a in enumerate(adapters) for name in _trainable(a)
    }
    assert set(_trainable(encoder)) == adapter_names
    assert all(".base." not in name for name in adapter_names)
    with pytest.raises(ValueError, match="already carries Conv-LoRA"):
        inject_conv_lora(encoder, ConvLoraConfig(rank=2, experts=2))


def test_collect_balance_loss_is_the_mean_over_blocks() -> None:
    adapters = [_adapter(seed, experts=3, top_k=1) for seed in range(3)]
    assert float(collect_balance_loss(adapters)) == 0.0  # before any forward
    with torch.no_grad():
        for adapter in adapters:
            adapter.train()(_tokens(batch=8))
    each = [float(a.mixture.last_balance_loss) for a in adapters]
    assert float(collect_balance_loss(adapters)) == pytest.approx(np.mean(each))


def test_adapter_refuses_a_flat_token_sequence() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        _adapter()(torch.randn(2, 36, DIM))


# ---------------------------------------------------------------- the AutoGluon reference preset
PRESET = REPO / "configs" / "conv-lora-reference.yaml"


def _preset_lora() -> ConvLoraConfig:
    return ConvLoraConfig(**read_overlay(PRESET)["sam.lora"])


def test_defaults_keep_bilinear_area_resizes_and_the_mean_over_blocks() -> None:
    default = ConvLoraConfig()
    assert (default.interpolation, default.balance_reduction) == ("bilinear_area", "mean")
    assert load_params(REPO / "params.yaml").sam.lora == default  # the embedded default
    torch.manual_seed(0)
    expert = ScaledConvExpert(2, scale=3)
    grid = torch.randn(2, 2, 5, 7)
    up = F.interpolate(grid, scale_factor=3, mode="bilinear", align_corners=False)
    today = F.interpolate(F.gelu(expert.conv(up)), size=(5, 7), mode="area")
    assert torch.equal(expert(grid), today)
    bicubic = ScaledConvExpert(2, scale=3, interpolation="bicubic")
    bicubic.load_state_dict(expert.state_dict())
    assert not torch.allclose(bicubic(grid), today, atol=1e-3)


def test_reference_preset_applies_to_params_yaml_and_loads(tmp_path: Path) -> None:
    params = Path(shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml"))
    changed = apply_overlay(params, PRESET)
    assert list(changed) == ["sam.lora"]
    loaded, original = load_params(params), load_params(REPO / "params.yaml")
    assert loaded.sam.lora == _preset_lora()
    assert (loaded.sam.lora.rank, loaded.sam.lora.experts, loaded.sam.lora.top_k) == (2, 8, 1)
    assert loaded.sam.lora.alpha / loaded.sam.lora.rank == 16.0  # AutoGluon's alpha 32 at rank 2
    assert loaded.sam.lora.interpolation == "bicubic" and loaded.sam.lora.balance_reduction == "sum"
    assert loaded.sam.lora.gate_scales_output is False
    # everything but sam.lora as in the repository's params.yaml
    assert loaded.model_copy(update={"sam": original.sam}) == original
    assert loaded.sam.model_copy(update={"lora": original.sam.lora}) == original.sam


def _autogluon_conv_lora(
    adapter: ConvLoRAQKV, tokens: torch.Tensor, alpha: float, rank: int
) -> torch.Tensor:
    """AutoGluon's ConvLoRALinear.forward (models/conv_lora/adaptation_layers.py), eval mode.

    MoEConv gates top-1 on the pooled bottleneck (no noise outside training); expert i resizes by
    i with bicubic both ways around conv + GELU; SparseDispatcher.combine with
    multiply_by_gates=False adds exp(expert output) ungated and takes the log; the result is
    added to the bottleneck and goes through B, scaled by alpha / r.
    """
    result = F.linear(tokens, adapter.base.weight, adapter.base.bias)
    lora = (tokens @ adapter.lora_a.weight.T).permute(0, 3, 1, 2)  # (N, r, H, W)
    height, width = lora.shape[-2:]
    w_gate = adapter.mixture.gate.weight.T  # AutoGluon's (d, M) layout
    chosen = (lora.mean(dim=(2, 3)) @ w_gate).topk(1, dim=1).indices[:, 0]
    combined = torch.zeros_like(lora)
    for sample, index in enumerate(chosen.tolist()):
        ratio, conv = index + 1, adapter.mixture.experts[index].conv
        x = lora[sample : sample + 1]
        if ratio != 1:
            x = F.interpolate(x, scale_factor=ratio, mode="bicubic")
        x = F.gelu(F.conv2d(x, conv.weight, conv.bias, padding=1))
        if ratio != 1:
            x = F.interpolate(x, size=(height, width), mode="bicubic")
        combined[sample] += x[0].exp()
    lora = lora + combined.log()
    return result + (lora.permute(0, 2, 3, 1) @ adapter.lora_b.weight.T) * (alpha / rank)


def test_preset_layer_equals_the_autogluon_formulas_on_a_fixed_input() -> None:
    lora = _preset_lora()
    torch.manual_seed(0)
    adapter = ConvLoRAQKV(nn.Linear(DIM, 3 * DIM), lora).double().eval()
    with torch.no_grad():
        adapter.lora_b.weight.normal_()
        adapter.mixture.gate.weight.normal_(std=3.0)  # varied routing instead of the zero init
    tokens = _tokens(batch=8).double()
    with torch.no_grad():
        ours = adapter(tokens)
        reference = _autogluon_conv_lora(adapter, tokens, alpha=32.0, rank=2)
        chosen = adapter.mixture.route(adapter.lora_a(tokens).permute(0, 3, 1, 2).mean(dim=(2, 3)))
    upsampling = set(chosen.routed.nonzero()[:, 1].tolist()) - {0}
    assert len(upsampling) >= 2  # several of the bicubic experts in use
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    # the interpolation is what makes it match: the default resizes give another output
    today = ConvLoRAQKV(
        nn.Linear(DIM, 3 * DIM), lora.model_copy(update={"interpolation": "bilinear_area"})
    )
    today = today.double().eval()
    today.load_state_dict(adapter.state_dict())
    with torch.no_grad():
        assert not torch.allclose(today(tokens), reference, atol=1e-3)


def test_summed_balance_loss_is_depth_times_the_mean() -> None:
    small = SmallSamConfig(
        embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=8
    )
    images = torch.rand(2, 1, 32, 32)
    auxiliary = {}
    for reduction in ("mean", "sum"):
        lora = ConvLoraConfig(rank=2, experts=3, balance_weight=0.5, balance_reduction=reduction)
        torch.manual_seed(0)
        model = PeftSam(SamConfig(small=small, lora=lora)).train()
        torch.manual_seed(1)  # the same gate noise for both
        model(images)
        blocks = [float(a.mixture.last_balance_loss.detach()) for a in model.network.adapters]
        auxiliary[reduction] = float(model.auxiliary_loss().detach())
    assert len(blocks) == 2 and any(value > 0 for value in blocks)
    assert auxiliary["sum"] == pytest.approx(0.5 * sum(blocks))
    assert auxiliary["sum"] == pytest.approx(2 * auxiliary["mean"])


@pytest.mark.parametrize(
    ("key", "value"), [("interpolation", "nearest"), ("balance_reduction", "max")]
)
def test_bad_reference_choice_is_named_by_its_dotted_key(
    default_params: dict, key: str, value: str
) -> None:
    default_params["sam"]["lora"][key] = value
    with pytest.raises(ConfigError) as caught:
        parse_params(default_params, "params.yaml")
    assert caught.value.key == f"sam.lora.{key}"
    assert str(caught.value).startswith(f"params.yaml: sam.lora.{key}: unknown value '{value}'")
