"""params.yaml is validated: unknown keys, wrong types and dangling names are refused by key."""

from __future__ import annotations

import pytest

from xctsam.config.params import load_params, parse_params
from xctsam.util.errors import ConfigError, InputError

from .conftest import REPO, write_params


def test_project_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert {"Tr-sim", "Tr-real", *(f"Te-{i}" for i in range(1, 7))} <= set(params.data.splits)
    assert params.data.splits["Tr-real"].labelled is False
    assert params.data.splits["Te-3"].scanner == params.data.splits["Tr-real"].scanner  # in distribution


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda p: p["data"]["phantom"].update(shpe=[1, 2, 3]), "data.phantom.shpe"),
        (lambda p: p["data"]["scanners"]["lab"].update(photons="many"), "data.scanners.lab.photons"),
        (lambda p: p["data"]["recipes"]["standard"]["gas_pore"].update(fraction=1.5), "data.recipes.standard.gas_pore.fraction"),
        (lambda p: p["data"]["splits"]["Te-1"].update(scanner="nope"), "data.splits.Te-1.scanner"),
        (lambda p: p["data"]["splits"]["Te-2"].update(alloy="unobtainium"), "data.splits.Te-2.alloy"),
        (lambda p: p["data"]["splits"]["Te-3"].update(recipe="missing"), "data.splits.Te-3.recipe"),
        (lambda p: p.update(sead=1), "sead"),
    ],
)
def test_bad_key_is_named(default_params: dict, mutate, key: str) -> None:
    mutate(default_params)
    with pytest.raises(ConfigError) as caught:
        parse_params(default_params, "params.yaml")
    assert caught.value.key == key
    assert str(caught.value).startswith(f"params.yaml: {key}:")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("small", "message"),
    [
        ({"embed_dim": 192, "num_heads": 5}, "num_heads: 5 does not divide embed_dim 192"),
        ({"depth": 4, "global_attn_indexes": [1, 4]}, "global_attn_indexes: [4] outside blocks 0..3"),
    ],
)
def test_unbuildable_small_sam_refused(default_params: dict, small: dict, message: str) -> None:
    default_params["sam"]["small"].update(small)
    with pytest.raises(ConfigError) as caught:
        parse_params(default_params)
    assert caught.value.key == "sam.small" and message in str(caught.value)


def test_synthetic_split_refuses_a_scanner(default_params: dict) -> None:
    default_params["data"]["splits"]["Tr-sim"]["scanner"] = "lab"
    with pytest.raises(ConfigError, match="data.splits.Tr-sim: a synthetic split is rendered without a scanner"):
        parse_params(default_params)


def test_non_square_slices_refused(default_params: dict) -> None:
    default_params["data"]["phantom"]["shape"] = [8, 64, 96]
    with pytest.raises(ConfigError, match="data.phantom: shape: slices must be square"):
        parse_params(default_params)


def test_missing_and_malformed_files(tmp_path) -> None:
    with pytest.raises(InputError, match="params file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML at line"):
        load_params(bad)


def test_round_trip_through_file(tmp_path, tiny_params: dict) -> None:
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params))
    assert params.data.phantom.shape == (6, 48, 48)
