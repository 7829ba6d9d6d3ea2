"""`xctsam params apply`: an overlay of dotted keys written into params.yaml, comments kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from xctsam.cli import main
from xctsam.config.params import load_params

from .conftest import REPO


def _project_params(tmp_path: Path) -> Path:
    return Path(shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml"))


def test_real_mode_overlay_replaces_sections_and_keeps_comments(tmp_path: Path) -> None:
    params = _project_params(tmp_path)
    before = params.read_text()
    assert main(["params", "apply", str(REPO / "configs" / "real-samgan.yaml"), "--params", str(params)]) == 0
    loaded = load_params(params)
    assert loaded.study.root == Path("data/imported/sam-material-gan") and loaded.study.gan == []
    assert loaded.data.splits == {} and loaded.fid.pairs == {} and loaded.fid.window == (0, 255)
    assert loaded.data.imports["sam-material-gan"].format == "samgan"
    assert loaded.finetune.volumes == {"real/Te-6": ["test_inp_6_for_fewShotTrain_matched.h5"]}
    after = params.read_text()
    kept = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert kept and all(line in after for line in kept if "Tr-sim" not in line and "Te-" not in line)
    assert loaded.data.scanners == load_params(REPO / "params.yaml").data.scanners  # untouched


def test_bad_overlay_key_is_refused_and_nothing_written(tmp_path: Path, capsys) -> None:
    params = _project_params(tmp_path)
    before = params.read_text()
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(yaml.safe_dump({"sam.lora.rank": 8, "sam.lora.rnak": 8}))
    assert main(["params", "apply", str(overlay), "--params", str(params)]) == 2
    assert "sam.lora.rnak" in capsys.readouterr().err
    assert params.read_text() == before


def test_overlay_that_is_not_a_mapping_is_refused(tmp_path: Path, capsys) -> None:
    params = _project_params(tmp_path)
    overlay = tmp_path / "list.yaml"
    overlay.write_text("- sam.lora.rank\n")
    assert main(["params", "apply", str(overlay), "--params", str(params)]) == 2
    assert "list.yaml" in capsys.readouterr().err


def test_paper_scale_overlay_applies_on_top_of_the_real_mode(tmp_path: Path) -> None:
    params = _project_params(tmp_path)
    for overlay in ("real-samgan.yaml", "real-samgan-paper.yaml"):
        assert main(["params", "apply", str(REPO / "configs" / overlay), "--params", str(params)]) == 0
    loaded = load_params(params)
    assert loaded.sam.variant == "vit_b" and loaded.sam.image_size == 1024 and loaded.pretrain.stand_ins == []
    assert loaded.train.sam.tile == 512 and loaded.predict.tile == 512
    assert loaded.study.root == Path("data/imported/sam-material-gan")  # the real mode kept
