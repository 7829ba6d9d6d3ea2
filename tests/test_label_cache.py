"""The label cache: a volume segmented once is read back, and only for exactly that prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_predict import UNIT, QuantiseModel
from xctsam.config.eval import PredictConfig
from xctsam.data.volumes import Volume, write_volume
from xctsam.eval.evaluate import SplitCounts, count_volume
from xctsam.eval.label_cache import CACHE_ENV, LabelCache, default_folder, model_digest
from xctsam.eval.predict import predict_volume

CONFIG = PredictConfig(tile=32, overlap=0.25, batch=4)


class CountingModel(QuantiseModel):
    """QuantiseModel that counts its forward passes and shifts its input by its one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return super().forward((images + self.anchor).clamp(0, 1))


@pytest.fixture
def labelled_volume(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    image = rng.random((4, 40, 48)).astype(np.float32)
    labels = np.clip(np.floor(image * 4), 0, 3).astype(np.uint8)
    path = tmp_path / "volume.h5"
    write_volume(path, image, labels)
    return path


def plain_labels(model: QuantiseModel, path: Path, config: PredictConfig = CONFIG) -> np.ndarray:
    return np.stack([p.labels for p in predict_volume(model, path, UNIT, config, "cpu", progress=False)])


def cached_labels(cache: LabelCache, model: QuantiseModel, path: Path, config: PredictConfig = CONFIG) -> np.ndarray:
    with Volume(path) as volume:
        return np.stack([labels for _, labels in cache.predictions(model, volume, UNIT, config, "cpu")])


def test_a_stored_prediction_is_read_back_without_running_the_model(tmp_path: Path, labelled_volume: Path) -> None:
    model, cache = CountingModel(), LabelCache(tmp_path / "cache")
    expected = plain_labels(model, labelled_volume)
    model.forwards = 0
    first = cached_labels(cache, model, labelled_volume)
    ran = model.forwards
    second = cached_labels(LabelCache(tmp_path / "cache"), model, labelled_volume)  # a new stage, same folder
    assert ran > 0 and model.forwards == ran
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert len(list((tmp_path / "cache" / "labels").glob("*.npy"))) == 1


def test_other_weights_volume_contents_or_predict_params_are_predicted_again(tmp_path: Path, labelled_volume: Path) -> None:
    model, cache = CountingModel(), LabelCache(tmp_path / "cache")
    cached_labels(cache, model, labelled_volume)

    def runs(action) -> int:
        before = model.forwards
        action()
        return model.forwards - before

    assert runs(lambda: cached_labels(cache, model, labelled_volume)) == 0
    assert runs(lambda: cached_labels(cache, model, labelled_volume, CONFIG.model_copy(update={"overlap": 0.5}))) > 0
    with torch.no_grad():
        model.anchor.fill_(0.3)
    assert runs(lambda: np.testing.assert_array_equal(cached_labels(LabelCache(tmp_path / "cache"), model, labelled_volume), plain_labels(model, labelled_volume))) > 0
    with Volume(labelled_volume) as volume:
        image, labels = volume.image(), volume.labels()
    write_volume(labelled_volume, image[::-1].copy(), labels[::-1].copy())  # same path and shape, new contents
    assert runs(lambda: np.testing.assert_array_equal(cached_labels(cache, model, labelled_volume), plain_labels(model, labelled_volume))) > 0


def test_a_corrupt_or_misshapen_entry_is_predicted_again(tmp_path: Path, labelled_volume: Path) -> None:
    model, cache = CountingModel(), LabelCache(tmp_path / "cache")
    expected = cached_labels(cache, model, labelled_volume)
    (entry,) = (tmp_path / "cache" / "labels").glob("*.npy")
    for bad in (b"not an npy file", None):
        if bad is None:
            np.save(entry, np.zeros((2, 2, 2), np.uint8))
        else:
            entry.write_bytes(bad)
        before = model.forwards
        np.testing.assert_array_equal(cached_labels(cache, model, labelled_volume), expected)
        assert model.forwards > before


def test_a_prediction_stopped_half_way_stores_nothing(tmp_path: Path, labelled_volume: Path) -> None:
    model, cache = CountingModel(), LabelCache(tmp_path / "cache")
    with Volume(labelled_volume) as volume:
        stream = cache.predictions(model, volume, UNIT, CONFIG, "cpu")
        next(stream)
        stream.close()  # what an exception or Ctrl-C in the consumer does
    assert list((tmp_path / "cache" / "labels").iterdir()) == []


def test_count_volume_uses_the_cache_for_clean_input_only(tmp_path: Path, labelled_volume: Path) -> None:
    model, cache = CountingModel(), LabelCache(tmp_path / "cache")
    plain, cached, noisy = SplitCounts(), SplitCounts(), SplitCounts()
    count_volume(model, labelled_volume, UNIT, CONFIG, "cpu", plain)
    count_volume(model, labelled_volume, UNIT, CONFIG, "cpu", cached, cache=cache)
    before = model.forwards
    count_volume(model, labelled_volume, UNIT, CONFIG, "cpu", noisy, transform=lambda unit: 1 - unit, cache=cache)
    assert model.forwards > before  # a transformed input is never answered from the cache
    assert len(list((tmp_path / "cache" / "labels").glob("*.npy"))) == 1
    np.testing.assert_array_equal(np.stack(cached.per_slice), np.stack(plain.per_slice))
    assert not np.array_equal(np.stack(noisy.per_slice), np.stack(plain.per_slice))


def test_the_digest_follows_the_weights() -> None:
    model = CountingModel()
    before = model_digest(model)
    assert model_digest(CountingModel()) == before
    with torch.no_grad():
        model.anchor.add_(1e-6)
    assert model_digest(model) != before


def test_the_cache_folder_is_the_projects_unless_moved_or_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_folder() == tmp_path / ".xctsam-cache"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert default_folder() == tmp_path / "elsewhere"
    monkeypatch.setenv(CACHE_ENV, "off")
    assert default_folder() is None
    assert LabelCache.default().folder is None
