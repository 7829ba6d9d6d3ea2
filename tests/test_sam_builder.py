"""SAM construction at any image size and strict, hash-checked checkpoint loading.

Official checkpoints cannot be downloaded here, so vit_b is checked on a state dict saved from a
randomly initialised vit_b (named after its own sha256 like the official files), loaded at 1024
and at 256. Everything else uses the small CPU variant.
"""

from __future__ import annotations

import gc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xctsam.config.sam import SamConfig, SmallSamConfig
from xctsam.models.sam_builder import (
    OFFICIAL_ENCODERS,
    POS_EMBED_KEY,
    build_sam,
    file_sha256,
    load_sam_checkpoint,
)
from xctsam.util.compat import ensure_torchvision
from xctsam.util.errors import InputError

ensure_torchvision()
from segment_anything import sam_model_registry  # noqa: E402

SMALL = SamConfig(variant="small", image_size=256)


def _randomise_position_tables(model: torch.nn.Module) -> None:
    # SAM zero-initialises pos_embed and rel_pos: resizing zeros would prove nothing.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == POS_EMBED_KEY or "rel_pos" in name:
                parameter.normal_()


def _save_named_by_hash(state: dict[str, torch.Tensor], folder: Path, stem: str) -> Path:
    """Save like the official files: <stem>_<first 6 hex of the file's own sha256>.pth."""
    staging = folder / f"{stem}.staging"
    torch.save(state, staging)
    return staging.rename(folder / f"{stem}_{file_sha256(staging)[:6]}.pth")


def _small_state(seed: int = 0, config: SamConfig = SMALL) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_sam(config)
    _randomise_position_tables(model)
    return model.state_dict()


def _load_reference(path: Path) -> dict[str, torch.Tensor]:
    # Memory-mapped, so the reference costs page cache rather than another 375 MB of heap.
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _global_block_keys(indexes: tuple[int, ...]) -> set[str]:
    return {f"image_encoder.blocks.{i}.attn.rel_pos_{axis}" for i in indexes for axis in "hw"}


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    torch.manual_seed(1)
    model = build_sam(SamConfig(variant="vit_b", image_size=1024))
    _randomise_position_tables(model)
    path = _save_named_by_hash(
        model.state_dict(), tmp_path_factory.mktemp("checkpoints"), "sam_vit_b"
    )
    del model
    gc.collect()
    yield path
    path.unlink()


# ---------------------------------------------------------------- construction
@pytest.mark.parametrize("variant", sorted(OFFICIAL_ENCODERS))
def test_official_variants_match_segment_anything_builders_at_1024(variant: str) -> None:
    # On the meta device nothing is allocated, so even vit_h (636M parameters) is free to build.
    with torch.device("meta"):
        theirs = sam_model_registry[variant]()
        ours = build_sam(SamConfig(variant=variant, image_size=1024))
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    assert list(our_state) == list(their_state)
    assert {k: v.shape for k, v in our_state.items()} == {
        k: v.shape for k, v in their_state.items()
    }
    assert [b.window_size for b in ours.image_encoder.blocks] == [
        b.window_size for b in theirs.image_encoder.blocks
    ]
    assert torch.equal(ours.pixel_std, theirs.pixel_std) and torch.equal(
        ours.pixel_mean, theirs.pixel_mean
    )


@pytest.mark.parametrize("image_size", [256, 512, 1024])
def test_geometry_follows_image_size(image_size: int) -> None:
    small = SmallSamConfig()
    model = build_sam(SamConfig(variant="small", image_size=image_size, small=small))
    grid = image_size // 16
    encoder, prompts = model.image_encoder, model.prompt_encoder
    assert encoder.pos_embed.shape == (1, grid, grid, small.embed_dim)
    assert prompts.image_embedding_size == (grid, grid)
    assert prompts.input_image_size == (image_size, image_size)
    assert prompts.mask_input_size == (4 * grid, 4 * grid)
    for index, block in enumerate(encoder.blocks):
        side = grid if index in small.global_attn_indexes else small.window_size
        assert block.window_size == (0 if index in small.global_attn_indexes else small.window_size)
        assert block.attn.rel_pos_h.shape[0] == block.attn.rel_pos_w.shape[0] == 2 * side - 1
    assert not model.training  # like segment_anything's builders


def test_small_variant_encodes_256_without_checkpoint() -> None:
    model = build_sam(SMALL)
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 16, 16)
    assert torch.isfinite(embedding).all()


def test_small_variant_runs_the_prompt_free_pipeline() -> None:
    model = build_sam(SMALL)
    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(2, 3, 256, 256))
        sparse, dense = model.prompt_encoder(points=None, boxes=None, masks=None)
        masks, iou = model.mask_decoder(
            image_embeddings=embedding[:1],  # the decoder takes one image embedding per call
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    assert sparse.shape == (1, 0, 256) and dense.shape == (1, 256, 16, 16)
    assert masks.shape == (1, 3, 64, 64) and iou.shape == (1, 3)
    assert torch.isfinite(masks).all() and masks.std() > 0


# ---------------------------------------------------------------- vit_b checkpoint round trip
def test_vit_b_checkpoint_loads_unchanged_at_1024(vit_b_checkpoint: Path) -> None:
    torch.manual_seed(2)
    model = build_sam(SamConfig(variant="vit_b", image_size=1024))
    reference = _load_reference(vit_b_checkpoint)
    key = "image_encoder.patch_embed.proj.weight"
    assert not torch.equal(model.state_dict()[key], reference[key])  # a fresh init differs

    info = load_sam_checkpoint(model, vit_b_checkpoint)

    assert info["hash_status"] == "verified" and info["variant_hash_ok"] is True
    assert info["sha256"] == file_sha256(vit_b_checkpoint)
    assert info["resized"] == []
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    del model, state, reference
    gc.collect()


def test_vit_b_checkpoint_is_resized_to_256(vit_b_checkpoint: Path) -> None:
    model = build_sam(SamConfig(variant="vit_b", image_size=256))
    info = load_sam_checkpoint(model, vit_b_checkpoint)
    reference = _load_reference(vit_b_checkpoint)
    state = model.state_dict()
    global_keys = _global_block_keys(OFFICIAL_ENCODERS["vit_b"].global_attn_indexes)

    assert {entry["key"] for entry in info["resized"]} == {POS_EMBED_KEY} | global_keys
    expected_pos = F.interpolate(
        reference[POS_EMBED_KEY].permute(0, 3, 1, 2),
        size=(16, 16),
        mode="bicubic",
        align_corners=False,
    ).permute(0, 2, 3, 1)
    assert state[POS_EMBED_KEY].shape == (1, 16, 16, 768)
    torch.testing.assert_close(state[POS_EMBED_KEY], expected_pos)
    for key in global_keys:
        expected_table = F.interpolate(reference[key].T[None], size=31, mode="linear")[0].T
        assert state[key].shape == (31, 64)
        torch.testing.assert_close(state[key], expected_table)
    unchanged = set(reference) - {POS_EMBED_KEY} - global_keys
    window_tables = {k for k in unchanged if "rel_pos" in k}
    assert len(window_tables) == 2 * 8 and all(state[k].shape == (27, 64) for k in window_tables)
    assert all(torch.equal(state[k], reference[k]) for k in unchanged)

    with torch.no_grad():
        embedding = model.image_encoder(torch.randn(1, 3, 256, 256))
    assert embedding.shape == (1, 256, 16, 16) and torch.isfinite(embedding).all()
    del model, state, reference
    gc.collect()


def test_vit_b_checkpoint_into_small_names_unexpected_keys(vit_b_checkpoint: Path) -> None:
    model = build_sam(SMALL)
    unexpected = set(_load_reference(vit_b_checkpoint)) - set(model.state_dict())
    with pytest.raises(InputError) as caught:
        load_sam_checkpoint(model, vit_b_checkpoint)
    message = str(caught.value)
    assert vit_b_checkpoint.name in message and "does not fit sam small" in message
    assert f"0 missing [], {len(unexpected)} unexpected [image_encoder.blocks.4." in message


# ---------------------------------------------------------------- refusals and hash status
def test_small_state_into_vit_b_names_missing_keys(tmp_path: Path) -> None:
    path = _save_named_by_hash(_small_state(), tmp_path, "sam_small")
    model = build_sam(SamConfig(variant="vit_b", image_size=256))
    missing = set(model.state_dict()) - set(torch.load(path, weights_only=True))
    with pytest.raises(InputError) as caught:
        load_sam_checkpoint(model, path)
    message = str(caught.value)
    assert "does not fit sam vit_b" in message
    assert f"{len(missing)} missing [image_encoder.blocks.4.norm1.weight, " in message
    assert "0 unexpected []" in message
    del model
    gc.collect()


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    narrow = SamConfig(variant="small", small=SmallSamConfig(embed_dim=96))
    path = tmp_path / "narrow.pth"
    torch.save(_small_state(config=narrow), path)
    with pytest.raises(
        InputError, match=r"pos_embed has shape \(1, 16, 16, 96\).*\(1, 16, 16, 192\)"
    ):
        load_sam_checkpoint(build_sam(SMALL), path)


def test_wrong_hash_suffix_is_refused_before_loading(tmp_path: Path) -> None:
    staging = tmp_path / "state.pth"
    torch.save(_small_state(), staging)
    actual = file_sha256(staging)
    wrong = format((int(actual[:6], 16) + 1) % 16**6, "06x")
    path = staging.rename(tmp_path / f"sam_vit_b_{wrong}.pth")
    model = build_sam(SMALL)
    with pytest.raises(
        InputError, match=rf"sam_vit_b_{wrong}\.pth: sha256 {actual[:12]}.*'{wrong}'"
    ):
        load_sam_checkpoint(model, path)
    assert load_sam_checkpoint(model, path, verify_hash=False)["hash_status"] == "skipped"


def test_own_checkpoint_without_hash_suffix_loads_unverified(tmp_path: Path) -> None:
    state = _small_state(seed=3)
    path = tmp_path / "run_20240101.pth"  # a hex-looking suffix that is not an official name
    torch.save(state, path)
    model = build_sam(SMALL)
    info = load_sam_checkpoint(model, path)
    assert info["hash_status"] == "unverified" and info["variant_hash_ok"] is False
    assert info["sha256"] == file_sha256(path)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def test_build_sam_loads_the_configured_checkpoint(tmp_path: Path) -> None:
    state = _small_state(seed=4)
    path = _save_named_by_hash(state, tmp_path, "sam_small")
    model = build_sam(SMALL.model_copy(update={"checkpoint": path}))
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)


def _write_text(path: Path) -> None:
    path.write_text("these are not weights\n")


def _write_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.txt", "a zip, but not a torch archive")


def _write_wrapped_state(path: Path) -> None:
    torch.save({"model": _small_state(), "epoch": 3}, path)


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (_write_text, "not a PyTorch checkpoint"),
        (_write_zip, "not a PyTorch checkpoint"),
        (_write_wrapped_state, r"not a plain state dict of tensors: entries \[model, epoch\]"),
    ],
)
def test_unloadable_files_are_refused(tmp_path: Path, write, problem: str) -> None:
    path = tmp_path / "weights.pth"
    write(path)
    with pytest.raises(InputError, match=rf"weights\.pth: {problem}"):
        load_sam_checkpoint(build_sam(SMALL), path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_sam_checkpoint(build_sam(SMALL), tmp_path / "sam_vit_b_01ec64.pth")
