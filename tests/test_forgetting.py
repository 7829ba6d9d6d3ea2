"""Re-fine-tuning SAM-GAN on real volumes and the forgetting deltas, on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from xctsam.config.params import Params, parse_params
from xctsam.data.datasets import SliceRef
from xctsam.data.volumes import write_volume
from xctsam.eval.evaluate import SplitCounts
from xctsam.eval.forgetting import evaluate_forgetting, forgetting_deltas
from xctsam.eval.holdout import check_no_overlap, evaluation_volumes
from xctsam.models.factory import load_segmenter
from xctsam.train.finetune import finetune_real, finetune_slices
from xctsam.train.stage import train_model
from xctsam.util.errors import ConfigError, InputError

from .test_train_stage import _coupon

NAN = math.nan


# ---------------------------------------------------------------- deltas
def test_deltas_are_after_minus_before_with_nan_aware_means() -> None:
    before = {"Te-1": {"material": 0.5, "pore": 0.4}, "Te-2": {"material": 0.6, "pore": NAN}}
    after = {
        "Sub": {"Te-1": {"material": 0.7, "pore": 0.1}, "Te-2": {"material": 0.9, "pore": 0.3}},
        "Full": {"Te-1": {"material": NAN, "pore": 0.2}, "Te-2": {"material": 0.8, "pore": NAN}},
    }
    deltas = forgetting_deltas(before, after)
    assert set(deltas) == {"Sub", "Full"}
    assert deltas["Sub"]["Te-1"]["material"] == pytest.approx(0.2)
    assert deltas["Sub"]["Te-1"]["pore"] == pytest.approx(-0.3)
    assert math.isnan(deltas["Sub"]["Te-2"]["pore"])  # undefined before
    assert math.isnan(deltas["Full"]["Te-1"]["material"])  # undefined after
    assert deltas["Sub"]["mean"]["material"] == pytest.approx((0.2 + 0.3) / 2)
    assert deltas["Sub"]["mean"]["pore"] == pytest.approx(-0.3)  # only Te-1 is defined
    assert deltas["Full"]["mean"]["material"] == pytest.approx(0.2)
    assert deltas["Full"]["mean"]["pore"] == pytest.approx(-0.2)


def test_mean_is_nan_when_no_split_defines_the_class() -> None:
    deltas = forgetting_deltas({"Te-1": {"inclusion": NAN}}, {"Full": {"Te-1": {"inclusion": 0.5}}})
    assert math.isnan(deltas["Full"]["mean"]["inclusion"])


# ---------------------------------------------------------------- data and params
@pytest.fixture
def project(
    tmp_path: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch
) -> tuple[Params, Path]:
    """Tr-GAN (2 volumes: train + validation) and Te-1, Te-2 with 2 labelled volumes each."""
    rng = np.random.default_rng(0)
    for split, count in (("synthetic/Tr-GAN", 2), ("real/Te-1", 2), ("real/Te-2", 2)):
        for i in range(count):
            write_volume(tmp_path / "data" / split / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    tiny_params["train"]["sam"].update(
        {
            "steps": 4,
            "epoch_steps": 2,
            "tile": 32,
            "batch": 2,
            "val_slices": 2,
            "warmup_steps": 1,
            "checkpoint_every": 2,
        }
    )
    tiny_params["sam"]["small"] = {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "global_attn_indexes": [1],
        "window_size": 4,
    }
    tiny_params["sam"]["lora"].update({"rank": 2, "experts": 2})
    tiny_params["predict"] = {"tile": 32, "overlap": 0.25, "batch": 4}
    tiny_params["eval"] = {"splits": ["real/Te-1", "real/Te-2"]}
    tiny_params["finetune"] = {
        "volumes": {"real/Te-1": ["v0.h5"], "real/Te-2": ["v0.h5"]},
        "sub_fraction": 0.25,
        "steps": 4,
        "lr": 1e-3,
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return parse_params(tiny_params), tmp_path / "data"


def _with_finetune_volumes(params: Params, volumes: dict[str, list[str]]) -> Params:
    return params.model_copy(
        update={"finetune": params.finetune.model_copy(update={"volumes": volumes})}
    )


def _holdout_sections(params: Params) -> tuple[dict[str, list[str]], list[str]]:
    """What evaluation_volumes reads of params: finetune.volumes and eval.splits."""
    return params.finetune.volumes, params.eval.splits


def test_evaluation_volumes_exclude_the_finetuning_ones(project: tuple[Params, Path]) -> None:
    params, root = project
    volumes = evaluation_volumes(*_holdout_sections(params), root)
    assert {folder: [path.name for path in paths] for folder, paths in volumes.items()} == {
        "real/Te-1": ["v1.h5"],
        "real/Te-2": ["v1.h5"],
    }


def test_sub_takes_a_seeded_share_of_the_full_slices(project: tuple[Params, Path]) -> None:
    params, root = project
    full = finetune_slices(params.finetune, params.seed, root, "full")
    sub = finetune_slices(params.finetune, params.seed, root, "sub")
    assert len(full) == 8 and {ref.volume.name for ref in full} == {"v0.h5"}
    assert len(sub) == 2 and set(sub) <= set(full)
    assert finetune_slices(params.finetune, params.seed, root, "sub") == sub


def test_overlap_is_refused_naming_the_key_and_volume(project: tuple[Params, Path]) -> None:
    params, root = project
    volumes = evaluation_volumes(*_holdout_sections(params), root)
    evaluated = root / "real" / "Te-2" / "v1.h5"
    with pytest.raises(ConfigError) as caught:
        check_no_overlap(
            [SliceRef(root / "real" / "Te-1" / "v0.h5", 0), SliceRef(evaluated, 3)], volumes
        )
    assert caught.value.key == "finetune.volumes" and str(evaluated) in str(caught.value)
    check_no_overlap(
        [SliceRef(root / "real" / "Te-1" / "v0.h5", 0)], volumes
    )  # no overlap: no error


def test_split_wholly_finetuned_on_is_left_out_of_forgetting(project: tuple[Params, Path]) -> None:
    params, root = project
    whole_split = _with_finetune_volumes(params, {"real/Te-1": ["v0.h5", "v1.h5"]})
    volumes = evaluation_volumes(*_holdout_sections(whole_split), root)
    assert {folder: [path.name for path in paths] for folder, paths in volumes.items()} == {
        "real/Te-2": ["v0.h5", "v1.h5"]
    }


def test_no_split_left_to_evaluate_is_refused(project: tuple[Params, Path]) -> None:
    params, root = project
    everything = {"real/Te-1": ["v0.h5", "v1.h5"], "real/Te-2": ["v0.h5", "v1.h5"]}
    with pytest.raises(ConfigError, match="finetune.volumes.*none is left"):
        evaluation_volumes(*_holdout_sections(_with_finetune_volumes(params, everything)), root)


def test_unknown_finetune_volume_is_named(project: tuple[Params, Path]) -> None:
    params, root = project
    wrong = _with_finetune_volumes(params, {"real/Te-1": ["nope.h5"]})
    with pytest.raises(InputError, match="nope.h5"):
        finetune_slices(wrong.finetune, wrong.seed, root, "full")


# ---------------------------------------------------------------- end to end
def test_finetune_then_forgetting_end_to_end(project: tuple[Params, Path], tmp_path: Path) -> None:
    import mlflow

    params, root = project
    base = train_model("sam", params, root, tmp_path / "models" / "sam").checkpoint
    tuned = {}
    for variant, name in (("sub", "SAM-FineReal-Sub"), ("full", "SAM-FineReal")):
        result = finetune_real(
            params, root, base, tmp_path / "models" / f"finetune_{variant}", variant
        )
        assert result.steps == 4 and result.checkpoint.is_file()
        tuned[name] = result.checkpoint
    _, base_window, _ = load_segmenter(base)
    _, window, meta = load_segmenter(tuned["SAM-FineReal-Sub"])
    assert window == base_window  # SAM-GAN's normalisation is kept
    assert meta["finetune"]["variant"] == "sub" and len(meta["finetune"]["slices"]) == 2

    out = tmp_path / "metrics" / "forgetting.json"
    report = evaluate_forgetting(params, root, {"SAM-GAN": base, **tuned}, out, progress=False)
    written = json.loads(out.read_text())
    assert set(written["iou"]) == {"SAM-GAN", *tuned}
    assert set(written["deltas"]) == set(tuned)
    for name in tuned:
        for split in ("Te-1", "Te-2"):
            after, before = (
                report["iou"][name][split]["material"],
                report["iou"]["SAM-GAN"][split]["material"],
            )
            assert report["deltas"][name][split]["material"] == pytest.approx(after - before)
        assert set(written["deltas"][name]) == {"Te-1", "Te-2", "mean"}
        bounds = written["intervals"][name]["Te-1"]["material"]
        assert bounds["low"] <= written["deltas"][name]["Te-1"]["material"] <= bounds["high"]
    # a volume of every split fine-tuned on: the per-split design, all adaptation, mean over all
    assert written["roles"] == {"Te-1": "adaptation", "Te-2": "adaptation"} and written["mean_of"] == ["Te-1", "Te-2"]

    run = mlflow.search_runs(
        experiment_names=["xctsam"],
        filter_string="attributes.run_name = 'forgetting'",
        output_format="list",
    )[0]
    logged = run.data.metrics
    assert logged["forgetting.SAM-FineReal.mean.material"] == pytest.approx(
        report["deltas"]["SAM-FineReal"]["mean"]["material"]
    )
    assert "forgetting.SAM-FineReal-Sub.Te-1.material" in logged
    runs = mlflow.search_runs(experiment_names=["xctsam"], output_format="list")
    assert {"finetune_real.sub", "finetune_real.full"} <= {r.info.run_name for r in runs}


def test_model_scored_on_its_own_finetuning_volume_is_refused(
    project: tuple[Params, Path], tmp_path: Path
) -> None:
    """Params changed after fine-tuning: the checkpoint's recorded volumes are checked again."""
    params, root = project
    fast = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={"sam": params.train.sam.model_copy(update={"steps": 1, "epoch_steps": 1})}
            )
        }
    )
    base = train_model("sam", fast, root, tmp_path / "models" / "sam").checkpoint
    tuned = finetune_real(
        fast.model_copy(update={"finetune": fast.finetune.model_copy(update={"steps": 1})}),
        root,
        base,
        tmp_path / "ft",
        "full",
    ).checkpoint
    moved = _with_finetune_volumes(fast, {"real/Te-1": ["v1.h5"], "real/Te-2": ["v1.h5"]})
    with pytest.raises(ConfigError, match="v0.h5"):
        evaluate_forgetting(
            moved,
            root,
            {"SAM-GAN": base, "SAM-FineReal": tuned},
            tmp_path / "f.json",
            progress=False,
            log_mlflow=False,
        )


def _counts(per_slice: np.ndarray) -> SplitCounts:
    counts = SplitCounts()
    for matrix in per_slice:
        counts.counter.matrix += matrix
        counts.per_slice.append(matrix)
        counts.volume_of_slice.append(0)
    return counts


def test_delta_intervals_are_paired_and_the_mean_covers_the_transfer_splits_only() -> None:
    from xctsam.config.eval import BootstrapConfig
    from xctsam.eval.forgetting import delta_intervals

    rng = np.random.default_rng(0)
    def slices(hits: int) -> np.ndarray:
        matrices = np.zeros((20, 4, 4), dtype=np.int64)
        matrices[:, 0, 0] = 1000
        matrices[:, 1, 1] = hits + rng.integers(0, 20, 20)  # material found
        matrices[:, 1, 0] = 100 - hits  # material missed
        return matrices
    before = {"Te-1": _counts(slices(60)), "Te-6": _counts(slices(40))}
    better = before["Te-6"].per_slice
    after_te6 = np.stack(better).copy()
    after_te6[:, 1, 1] += 30
    after_te6[:, 1, 0] -= 30
    after = {"Te-1": before["Te-1"], "Te-6": _counts(after_te6)}
    intervals = delta_intervals(before, after, ["Te-1"], BootstrapConfig(resamples=200), seed=0)
    assert intervals["Te-1"]["material"] == {"low": 0.0, "high": 0.0, "significant": False}  # unchanged
    assert intervals["Te-6"]["material"]["significant"] and intervals["Te-6"]["material"]["low"] > 0
    assert intervals["mean"]["material"] == intervals["Te-1"]["material"]  # Te-6 is adaptation, not averaged
    assert intervals["Te-6"]["pore"] == {"low": None, "high": None, "significant": False} or np.isnan(intervals["Te-6"]["pore"]["low"])
