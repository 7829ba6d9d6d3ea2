"""CycleGAN: network shapes, image pool, LR schedule, exact resume, synthesis, structure check, MLflow."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from xctsam.config.params import Params, parse_params
from xctsam.data.datasets import TileSampler
from xctsam.data.split_folders import read_manifest
from xctsam.data.volumes import Volume, write_volume
from xctsam.gan.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator, Translator
from xctsam.gan.model import linear_decay
from xctsam.gan.synthesize import file_sha256, structure_iou, synthesize
from xctsam.gan.train import CHECKPOINT, GENERATOR, METRICS, SAMPLES, train_gan
from xctsam.util.errors import InputError
from xctsam.util.interrupt import Interrupted

STEPS = 6
CHECKPOINT_EVERY = 2
TINY_GAN = {
    "tile": 32, "batch": 2, "steps": STEPS, "decay_start": 3, "lr": 2e-3,
    "generator": {"filters": 4, "blocks": 1}, "discriminator": {"filters": 4, "layers": 2},
    "pool_size": 3, "checkpoint_every": CHECKPOINT_EVERY, "sample_every": 3, "log_every": 1,
}


# ---------------------------------------------------------------- tiny data
def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _labels(rng: np.random.Generator, shape: tuple[int, int, int] = (4, 32, 32)) -> np.ndarray:
    """A solid disk (material) with one pore and one inclusion per slice, moving slice to slice."""
    labels = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[0]):
        cy, cx = rng.uniform(13, 19, size=2)
        labels[z][_disk(shape[1:], (cy, cx), 10)] = 1
        labels[z][_disk(shape[1:], (cy - 4, cx), 2)] = 2
        labels[z][_disk(shape[1:], (cy + 4, cx + 2), 1.5)] = 3
    return labels


RENDER = np.array([0.0, 0.47, 0.0, 0.65], dtype=np.float32)  # background, material, pore, inclusion


def _scan(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 'experimental' look: blurred, offset, noisy."""
    from scipy.ndimage import gaussian_filter

    blurred = gaussian_filter(RENDER[labels] * 0.9 + 0.02, sigma=(0, 1.0, 1.0))
    return (blurred + rng.normal(0, 0.04, labels.shape)).astype(np.float32)


def make_root(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(2):
        labels = _labels(rng)
        write_volume(root / "synthetic" / "Tr-sim" / f"Tr-sim_{i:03d}.h5", RENDER[labels], labels, {"fingerprint": f"sim{i}"})
        write_volume(root / "real" / "Tr-real" / f"Tr-real_{i:03d}.h5", _scan(_labels(rng), rng))
    return root


def tiny_params(default_params: dict, **gan: object) -> Params:
    raw = dict(default_params)
    raw["gan"] = {**raw["gan"], **TINY_GAN, **gan}
    return parse_params(raw)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    """Tiny nets run faster on one thread, and a busy machine cannot stall them in thread sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite MLflow store for the module, and a cwd outside the repo for its artifacts."""
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.chdir(folder)
        yield folder


@pytest.fixture(scope="module")
def params() -> Params:
    import yaml

    from .conftest import REPO

    return tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, params: Params, mlflow_store: Path) -> tuple[Path, Path, object]:
    """(data root, out dir, result) of one uninterrupted tiny training."""
    root = make_root(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("gan_a")
    return root, out, train_gan(params, root, out)


def _state(out_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(out_dir / CHECKPOINT, weights_only=True)
    return {f"{net}.{k}": v for net, weights in checkpoint["nets"].items() for k, v in weights.items()}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _interrupt_at(call: int, action):
    """A TileSampler.batch whose `call`-th call (1-based, over all samplers) runs `action` first."""
    original, calls = TileSampler.batch, []

    def batch(sampler: TileSampler, size: int):
        calls.append(size)
        if len(calls) == call:
            action()
        return original(sampler, size)

    return batch


# ---------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [(32, 32), (30, 22), (17, 9)])
def test_generator_output_has_the_input_size_and_range(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    generator = ResnetGenerator(filters=4, blocks=1)
    x = torch.rand(2, 1, *size) * 2 - 1
    y = generator(x)
    assert y.shape == x.shape
    assert float(y.detach().abs().max()) <= 1.0
    assert not torch.equal(y[0], y[1])  # depends on the input


def test_noise_inputs_vary_the_output_and_a_seed_fixes_it() -> None:
    from xctsam.data.datasets import IntensityWindow

    torch.manual_seed(0)
    flat = np.full((2, 24, 24), 0.5, dtype=np.float32)  # a noise-free render: one grey value
    window = IntensityWindow(0.0, 1.0)
    noisy = Translator(ResnetGenerator(filters=4, blocks=1, noise_channels=1).eval(), window, window)
    first, again, other = noisy.unit(flat, noise_seed=1), noisy.unit(flat, noise_seed=1), noisy.unit(flat, noise_seed=2)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    assert first[0].std() > 1e-4  # the flat input gets texture from the noise
    state = torch.get_rng_state()
    noisy.unit(flat, noise_seed=3)
    assert torch.equal(state, torch.get_rng_state())  # translating leaves training's RNG alone
    plain = Translator(ResnetGenerator(filters=4, blocks=1).eval(), window, window)
    assert np.array_equal(plain.unit(flat, noise_seed=1), plain.unit(flat, noise_seed=2))
    assert plain.unit(flat)[0].std() < 1e-5  # without noise, flat in gives flat out (away from the border)


def test_a_noise_input_generator_trains_saves_and_synthesizes_reproducibly(params: Params, default_params: dict, mlflow_store: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = make_root(tmp_path_factory.mktemp("data_noise"))
    noisy = tiny_params(default_params, generator={**TINY_GAN.get("generator", {}), "noise_channels": 1})
    out = tmp_path_factory.mktemp("gan_noise")
    train_gan(noisy, root, out)
    assert Translator.load(out / GENERATOR).generator.noise_channels == 1
    images = []
    for _ in range(2):
        synthesize(noisy, root, out / GENERATOR)
        with Volume(root / "synthetic" / "Tr-GAN" / "Tr-sim_000.h5") as volume:
            images.append(volume.image())
    assert np.array_equal(*images)  # seeded noise: the same split every run


@pytest.mark.parametrize(("size", "layers"), [(32, 2), (64, 3), (70, 3)])
def test_discriminator_scores_a_map_of_patches(size: int, layers: int) -> None:
    critic = PatchDiscriminator(filters=4, layers=layers)
    scores = critic(torch.rand(3, 1, size, size))
    side = PatchDiscriminator.output_size(size, layers)
    assert side > 1
    assert scores.shape == (3, 1, side, side)


def test_weights_are_normal_with_std_002() -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        weights = torch.cat([m.weight.flatten() for m in ResnetGenerator(filters=8, blocks=2).modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(float(weights.std()) - 0.02) < 0.002 and abs(float(weights.mean())) < 0.002


def test_image_pool_fills_then_swaps_half_for_history() -> None:
    pool = ImagePool(size=4, seed=1)
    first = torch.arange(4.0).reshape(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)  # filling: own images back
    from_history = 0
    seen = set(range(4))
    for i in range(100):
        new = torch.full((2, 1, 1, 1), 1000.0 + i)
        for value in pool.query(new).flatten().tolist():
            if value != 1000.0 + i:
                assert value in seen  # a past image, not an invented one
                from_history += 1
        seen.add(1000.0 + i)
    assert 70 <= from_history <= 130  # ~ half of 200 (binomial sd 7)


def test_image_pool_state_round_trip_continues_identically() -> None:
    pool = ImagePool(size=3, seed=2)
    for i in range(5):
        pool.query(torch.full((2, 1, 2, 2), float(i)))
    copy = ImagePool(size=3, seed=99)
    copy.load_state_dict(pool.state_dict())
    batch = torch.rand(4, 1, 2, 2)
    assert torch.equal(pool.query(batch), copy.query(batch))


def test_lr_is_held_then_decays_linearly_to_zero() -> None:
    factors = [linear_decay(step, 100, 60) for step in range(101)]
    assert factors[:61] == [1.0] * 61
    steps_down = np.diff(factors[60:])
    assert np.allclose(steps_down, -1 / 40)
    assert factors[100] == 0.0 and factors[99] == pytest.approx(1 / 40)
    assert linear_decay(5, 10, 10) == 1.0  # no decay phase


# ---------------------------------------------------------------- structure check
def test_structure_iou_is_one_for_the_render_and_lower_when_shifted() -> None:
    labels = _labels(np.random.default_rng(3))[0]
    perfect = RENDER[labels]
    assert structure_iou(perfect, labels) == 1.0
    shifted = np.roll(perfect, 4, axis=1)
    solid, bright = np.isin(labels, (1, 3)), np.roll(np.isin(labels, (1, 3)), 4, axis=1)
    expected = (solid & bright).sum() / (solid | bright).sum()
    assert structure_iou(shifted, labels) == pytest.approx(expected)
    assert expected < 0.8
    noisy = perfect + np.random.default_rng(0).normal(0, 0.02, perfect.shape)
    assert structure_iou(noisy, labels) > 0.97
    assert math.isnan(structure_iou(np.zeros((8, 8)), np.zeros((8, 8), dtype=np.uint8)))


# ---------------------------------------------------------------- training
def test_training_writes_generator_metrics_and_samples(reference) -> None:
    root, out, result = reference
    assert result.step == STEPS and result.resumed_from == 0 and result.steps_per_second > 0
    translator = Translator.load(out / GENERATOR)
    assert translator.step == STEPS
    assert translator.window_a.low == 0.0 and translator.window_a.high == pytest.approx(0.65)  # min..max of the render
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["step"] == STEPS and 0 <= metrics["structure_iou"] <= 1
    assert set(metrics["losses"]) >= {"adv_ab", "cycle_a", "identity_b", "d_a", "d_b"}
    grids = sorted((out / SAMPLES).glob("*.png"))
    assert [g.name for g in grids] == ["step_000003.png", "step_000006.png"]
    from PIL import Image

    assert np.asarray(Image.open(grids[0])).shape == (3 * 34 + 2, 4 * 34 + 2)  # rows A, A->B, B; 4 columns; 2 px frames


def test_finished_training_returns_at_once_and_other_params_retrain(reference, params: Params, default_params: dict, tmp_path: Path) -> None:
    root, out, _ = reference
    before = (out / GENERATOR).stat().st_mtime_ns
    again = train_gan(params, root, out)
    assert again.steps_per_second is None and again.run_id is None
    assert (out / GENERATOR).stat().st_mtime_ns == before
    other = train_gan(tiny_params(default_params, steps=2, decay_start=1), root, tmp_path / "gan")
    assert other.resumed_from == 0 and other.step == 2


def test_killed_run_resumes_from_last_checkpoint_to_the_same_weights(reference, params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, out_a, _ = reference
    out_b = tmp_path / "gan_b"

    def die() -> None:
        raise RuntimeError("killed")

    # two batches per step (A then B): call 9 is in step 5, after the checkpoint of step 4
    monkeypatch.setattr(TileSampler, "batch", _interrupt_at(9, die))
    with pytest.raises(RuntimeError, match="killed"):
        train_gan(params, root, out_b)
    assert torch.load(out_b / CHECKPOINT, weights_only=True)["step"] == 4
    assert not (out_b / GENERATOR).exists()
    monkeypatch.undo()

    resumed = train_gan(params, root, out_b)
    assert resumed.resumed_from == 4 and resumed.step == STEPS
    assert _max_difference(_state(out_a), _state(out_b)) == 0.0  # bit-identical on CPU


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_saves_the_step_it_finished_and_resumes_exactly(reference, params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int) -> None:
    root, out_a, _ = reference
    out_c = tmp_path / "gan_c"
    handler = signal.getsignal(signum)
    # call 5 is in step 3 (not a checkpoint step): the step completes, is saved, then we stop
    monkeypatch.setattr(TileSampler, "batch", _interrupt_at(5, lambda: os.kill(os.getpid(), signum)))
    with pytest.raises(Interrupted) as stopped:
        train_gan(params, root, out_c)
    assert stopped.value.exit_code == 128 + signum
    assert torch.load(out_c / CHECKPOINT, weights_only=True)["step"] == 3
    monkeypatch.undo()
    assert signal.getsignal(signum) is handler  # ours removed again

    resumed = train_gan(params, root, out_c)
    assert resumed.resumed_from == 3
    assert _max_difference(_state(out_a), _state(out_c)) == 0.0
    final_a, final_c = Translator.load(out_a / GENERATOR), Translator.load(out_c / GENERATOR)
    for name, weight in final_a.generator.state_dict().items():
        assert torch.equal(weight, final_c.generator.state_dict()[name])


def test_training_is_logged_to_mlflow(reference, params: Params) -> None:
    import mlflow

    _, _, result = reference
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags["stage"] == "gan_train" and run.data.params["gan.tile"] == "32"
    losses = client.get_metric_history(result.run_id, "gan.loss.g_total")
    assert [m.step for m in losses] == list(range(1, STEPS + 1))
    lrs = [m.value for m in sorted(client.get_metric_history(result.run_id, "gan.lr"), key=lambda m: m.step)]
    expected = [params.gan.lr * linear_decay(step, STEPS, params.gan.decay_start) for step in range(STEPS)]
    assert np.allclose(lrs, expected)
    assert run.data.metrics["gan.structure_iou"] == pytest.approx(result.structure_iou)
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "gan.structure_iou")) == [3, STEPS]  # at each sample grid
    assert "gan.steps_per_second" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(result.run_id, SAMPLES)]
    assert artifacts == [f"{SAMPLES}/step_000003.png", f"{SAMPLES}/step_000006.png"]
    found = mlflow.search_runs(experiment_names=["xctsam"], filter_string="tags.stage = 'gan_train'")
    assert result.run_id in set(found["run_id"])


def test_too_small_tile_for_the_critic_is_refused(default_params: dict, tmp_path: Path) -> None:
    from xctsam.util.errors import ConfigError

    with pytest.raises(ConfigError, match="gan.tile"):
        train_gan(tiny_params(default_params, tile=16, discriminator={"filters": 4, "layers": 3}), tmp_path, tmp_path / "gan")


# ---------------------------------------------------------------- synthesis
def test_synthesize_keeps_labels_and_records_provenance(reference, params: Params) -> None:
    root, out, _ = reference
    paths = synthesize(params, root, out / GENERATOR)
    sources = sorted((root / "synthetic" / "Tr-sim").glob("*.h5"))
    assert [p.name for p in paths] == [s.name for s in sources]
    assert all(p.parent == root / "synthetic" / "Tr-GAN" for p in paths)
    digest = file_sha256(out / GENERATOR)
    for source, target in zip(sources, paths):
        with Volume(source) as a, Volume(target) as b:
            assert np.array_equal(a.labels(), b.labels())
            assert b.image().shape == a.image().shape and not np.allclose(a.image(), b.image())
            attrs = b.attrs
            assert attrs["gan"]["generator_sha256"] == digest and attrs["gan"]["source_volume"] == str(source)
            assert attrs["split"] == "Tr-GAN" and attrs["gan"]["generator_step"] == STEPS
    manifest = read_manifest(root / "synthetic" / "Tr-GAN")
    assert 0 <= manifest["structure_iou"] <= 1 and manifest["gan"]["generator_sha256"] == digest
    with Volume(paths[0]) as first:
        assert first.attrs["structure_iou"] == pytest.approx(manifest["structure_iou_per_volume"][paths[0].name])


def test_synthesize_failing_midway_leaves_no_output_split(reference, params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import xctsam.gan.synthesize as module

    _, out, _ = reference
    root = make_root(tmp_path)
    original, done = module.translate_volume, []

    def second_fails(*args, **kwargs):
        if done:
            raise OSError("disk full")
        done.append(original(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(module, "translate_volume", second_fails)
    with pytest.raises(OSError, match="disk full"):
        synthesize(params, root, out / GENERATOR)
    assert done and sorted(p.name for p in (root / "synthetic").iterdir()) == ["Tr-sim"]


def test_synthesize_refuses_unlabelled_domain_a(reference, params: Params, tmp_path: Path) -> None:
    _, out, _ = reference
    write_volume(tmp_path / "synthetic" / "Tr-sim" / "a.h5", np.zeros((2, 16, 16), np.float32))
    with pytest.raises(InputError, match="no labels"):
        synthesize(params, tmp_path, out / GENERATOR)
