"""The stand-in SAM foundation: corpus, prompts, promptable training, checkpoint format, resume,
zero-shot baseline, CLI errors and the DVC stage that disappears at paper scale."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from xctsam.cli import main
from xctsam.config.params import parse_params
from xctsam.data.volumes import write_volume
from xctsam.models.foundation import describe_foundation
from xctsam.models.sam_builder import build_sam, load_sam_checkpoint
from xctsam.models.sam_peft import build_peft_sam
from xctsam.pretrain.prompts import component_boxes, mask_box, sample_prompts
from xctsam.pretrain.shapes import _shape_mask, make_image
from xctsam.pretrain.train import (
    PretrainResult,
    Trainer,
    pretrain_sam,
    sidecar_path,
    stand_in_config,
    step_loss,
)

from .conftest import REPO, write_params
from .test_train_stage import _coupon

TINY_SAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
TINY_PRETRAIN = {"steps": 3, "batch": 1, "prompts": 2, "objects": [3, 6], "warmup_steps": 1, "heldout_images": 1, "checkpoint_every": 2}


def _tiny_raw() -> dict:
    """The project's params with a tiny small SAM (the decoder is the architecture's own) and a
    3-step pretraining; SAM built from random weights."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sam"].update({"small": dict(TINY_SAM), "checkpoint": None})
    raw["pretrain"].update(TINY_PRETRAIN)
    return raw


@pytest.fixture
def tiny() -> dict:
    return _tiny_raw()


def _pretrain(raw: dict, out: Path, **kwargs) -> PretrainResult:
    return pretrain_sam(parse_params(raw), out, log_mlflow=False, **kwargs)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PretrainResult]:
    """One uninterrupted tiny pretraining, shared by the format and resume tests."""
    out = tmp_path_factory.mktemp("stand_in") / "sam_small_pretrained.pth"
    return out, _pretrain(_tiny_raw(), out)


# ---------------------------------------------------------------- corpus and prompts
def test_corpus_is_seeded_and_crowded() -> None:
    first, again, other = make_image([0, 0, 7], 128), make_image([0, 0, 7], 128), make_image([0, 0, 8], 128)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.instances, again.instances)
    assert not np.array_equal(first.image, other.image)
    counts = [len(make_image([1, 0, i], 128, objects=(6, 10)).instances) for i in range(5)]
    assert min(counts) >= 3 and np.mean(counts) >= 5  # many objects per image, even after occlusion
    assert first.image.dtype == np.float32 and first.image.min() >= 0.0 and first.image.max() <= 1.0
    assert first.instances.sum(axis=0).max() == 1  # visible parts never overlap
    assert first.instances.sum(axis=(1, 2)).min() >= 12


def test_blob_drawn_on_its_square_equals_the_whole_image_formula() -> None:
    """A blob is drawn only on the square its largest wobble can reach; nothing of it is cut off."""
    size = 96
    for seed in range(40):
        mask = _shape_mask(np.random.default_rng(seed), "blob", size)
        rng = np.random.default_rng(seed)  # the same draws, in the same order, over every pixel
        radius = float(np.exp(rng.uniform(np.log(2.5), np.log(size / 4))))
        cy, cx = rng.uniform(0, size, 2)
        terms = [(k, rng.uniform(0, 0.3), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
        y, x = np.mgrid[0:size, 0:size]
        theta = np.arctan2(y - cy, x - cx)
        wobble = sum(weight * np.cos(k * theta + phase) for k, weight, phase in terms)
        assert np.array_equal(mask, np.hypot(y - cy, x - cx) < radius * (1 + wobble)), seed


def test_prompts_lie_in_and_around_their_masks() -> None:
    item = make_image([0, 0, 3], 128)
    prompts = sample_prompts(item.instances, 50, 0.5, 0.1, np.random.default_rng(0))
    assert len(prompts.targets) == len(item.instances) and len(set(prompts.targets.tolist())) == len(item.instances)
    for (x, y), index in zip(prompts.points, prompts.point_of, strict=True):
        assert item.instances[index][int(y), int(x)]
    for box, index in zip(prompts.boxes, prompts.box_of, strict=True):
        exact = mask_box(item.instances[index])
        assert box[0] <= box[2] and box[1] <= box[3] and box.min() >= 0 and box.max() <= 127
        assert np.abs(box - exact).max() <= 20.0  # SAM's jitter cap
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:5, 3:9] = True
    mask[12:18, 14:16] = True
    assert sorted(component_boxes(mask).tolist()) == [[3, 2, 8, 4], [14, 12, 15, 17]]


# ---------------------------------------------------------------- training
def test_loss_falls_on_a_fixed_batch(tiny: dict) -> None:
    tiny["pretrain"]["focal_weight"] = 20.0  # SAM's weighting: its pixel-wise term drops within a few steps
    params = parse_params(tiny)
    torch.manual_seed(0)
    sam = build_sam(stand_in_config(params.sam)).train()
    optimizer = torch.optim.AdamW(sam.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):  # the same step index: the same images and prompts every time
        loss = step_loss(sam, params.pretrain, 0, torch.device("cpu"))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_encoder_learns_at_a_fraction_of_the_decoder_lr(tiny: dict) -> None:
    tiny["pretrain"].update({"lr": 1e-3, "encoder_lr_scale": 0.25})
    params = parse_params(tiny)
    sam = build_sam(stand_in_config(params.sam))
    trainer = Trainer.create(sam, params.pretrain, torch.device("cpu"))
    # the schedule scales both groups alike from these base rates
    base = {id(tensor): group["initial_lr"] for group in trainer.optimizer.param_groups for tensor in group["params"]}
    assert len(base) == len(list(sam.parameters()))  # every parameter trains, in exactly one group
    assert sorted({base[id(t)] for t in sam.image_encoder.parameters()}) == [pytest.approx(0.25e-3)]
    assert sorted({base[id(t)] for t in [*sam.mask_decoder.parameters(), *sam.prompt_encoder.parameters()]}) == [pytest.approx(1e-3)]


def test_checkpoint_is_official_format_and_loads_like_one(tiny: dict, pretrained: tuple[Path, PretrainResult]) -> None:
    out, result = pretrained
    saved = torch.load(out, weights_only=True)
    reference = build_sam(stand_in_config(parse_params(tiny).sam)).state_dict()
    assert list(saved) == list(reference) and all(saved[k].shape == reference[k].shape for k in reference)

    fresh = build_sam(stand_in_config(parse_params(tiny).sam))
    report = load_sam_checkpoint(fresh, out)
    assert report["hash_status"] == "unverified" and report["resized"] == []
    summary = json.loads(sidecar_path(out).read_text())
    assert summary == result.summary and summary["steps"] == 3
    assert set(summary["heldout"]) == {"heldout.miou_box", "heldout.miou_point", "heldout.objects"}

    tiny["sam"]["checkpoint"] = str(out)
    config = parse_params(tiny).sam
    peft = build_peft_sam(config)  # the PEFT-SAM loader takes it like an official file
    key = "image_encoder.patch_embed.proj.weight"
    assert torch.equal(peft.network.sam.state_dict()[key], saved[key])
    tags = describe_foundation(config)
    assert tags["foundation"] == "stand-in" and tags["foundation.sha256"] == summary["sha256"]
    assert describe_foundation(config.model_copy(update={"checkpoint": None})) == {"foundation": "random-init"}


def test_interrupted_pretraining_resumes_to_the_same_weights(tiny: dict, pretrained: tuple[Path, PretrainResult], tmp_path: Path) -> None:
    whole, _ = pretrained
    split = tmp_path / "split.pth"
    paused = _pretrain(tiny, split, stop_after=1)
    state = split.with_suffix(".state.pt")
    assert not paused.completed and state.is_file() and not split.exists()
    resumed = _pretrain(tiny, split)
    assert resumed.completed and not state.exists()
    a, b = torch.load(whole, weights_only=True), torch.load(split, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    stamp = split.stat().st_mtime_ns
    assert _pretrain(tiny, split).steps == 3 and split.stat().st_mtime_ns == stamp  # finished: returns at once


# ---------------------------------------------------------------- zero-shot and the CLI
def test_zero_shot_scores_every_split_and_class(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    for split in ("real/Te-1", "real/Te-2"):
        write_volume(tmp_path / "data" / split / "v0.h5", *_coupon(rng, (2, 40, 40)))
    checkpoint = tmp_path / "models" / "stand_in.pth"
    checkpoint.parent.mkdir()
    torch.save(build_sam(stand_in_config(parse_params(tiny).sam)).state_dict(), checkpoint)
    tiny["sam"]["checkpoint"] = str(checkpoint)
    tiny["eval"] = {"splits": ["real/Te-1", "real/Te-2"]}
    write_params(tmp_path / "params.yaml", tiny)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "zero-shot"]) == 0
    report = json.loads((tmp_path / "metrics" / "zero_shot" / "default.json").read_text())
    assert set(report["iou"]["sam_zero_shot"]) == {"Te-1", "Te-2"}
    assert set(report["iou"]["sam_zero_shot"]["Te-1"]) == {"background", "material", "pore", "inclusion"}
    assert report["slices"]["sam_zero_shot"] == {"Te-1": 2, "Te-2": 2}

    import mlflow

    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["foundation"] == "checkpoint" and "iou.Te-1.material" in run.data.metrics


@pytest.mark.parametrize(
    ("change", "named"),
    [({"pretrain": {"stepz": 3}}, "pretrain.stepz"), ({"sam": {"variant": "vit_b"}}, "sam.variant")],
)
def test_bad_params_exit_2_naming_the_key(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, named: str) -> None:
    for section, values in change.items():
        tiny[section].update(values)
    write_params(tmp_path / "params.yaml", tiny)
    assert main(["train", "pretrain", "-p", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "m.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]  # nothing half-written


def test_pretrain_stage_disappears_at_paper_scale(default_params: dict, tmp_path: Path) -> None:
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    default_params["pretrain"]["stand_ins"] = []
    default_params["sam"].update({"variant": "vit_b", "checkpoint": "models/foundation/sam_vit_b_01ec64.pth"})
    default_params["zero_shot"] = {"sam_vit_b": "models/foundation/sam_vit_b_01ec64.pth"}
    write_params(tmp_path / "params.yaml", default_params)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, timeout=120)
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "pretrain_sam" not in listed.stdout and "train_sam" in listed.stdout
    assert "zero_shot@sam_vit_b" in listed.stdout and "zero_shot@stand_in" not in listed.stdout
    write_params(tmp_path / "params.yaml", {**default_params, "pretrain": {**default_params["pretrain"], "stand_ins": ["sam_small_pretrained"]}})
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "pretrain_sam@sam_small_pretrained" in listed.stdout
