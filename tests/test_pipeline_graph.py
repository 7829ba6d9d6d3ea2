"""The study's DVC graph: what a params change reruns, read from dvc.yaml by DVC itself."""

from __future__ import annotations

import networkx as nx
import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def pipeline() -> tuple[nx.DiGraph, dict[str, list[str]]]:
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph  # edge (a, b): stage a depends on stage b
        names = {stage: stage.addressing for stage in graph.nodes}
        params = {
            stage.addressing: [key for dep in stage.deps if hasattr(dep, "params") for key in dep.params]
            for stage in graph.nodes
        }
        return nx.relabel_nodes(graph, names), params


def rerun_by(key: str, graph: nx.DiGraph, params: dict[str, list[str]]) -> set[str]:
    """Stages that declare `key` (or a section holding it) and every stage downstream of them."""
    direct = {stage for stage, keys in params.items() if any(key == k or key.startswith(k + ".") for k in keys)}
    return direct.union(*(nx.ancestors(graph, stage) for stage in direct))


def test_lora_rank_reruns_only_sam_stages_and_what_follows(pipeline: tuple[nx.DiGraph, dict[str, list[str]]]) -> None:
    graph, params = pipeline
    rerun = rerun_by("sam.lora.rank", graph, params)
    assert {"train_sam", "evaluate", "finetune_real@sub", "finetune_real@full", "forgetting", "robustness", "report"} <= rerun
    untouched = {stage for stage in graph if stage.startswith(("phantoms", "simulate", "import", "gan_train", "synthesize", "pretrain"))}
    untouched |= {"fid", "train_unet"}
    assert not rerun & untouched, rerun & untouched


def test_a_test_split_recipe_reruns_that_split_not_the_training(pipeline: tuple[nx.DiGraph, dict[str, list[str]]]) -> None:
    graph, params = pipeline
    rerun = rerun_by("data.splits.Te-6", graph, params)
    assert {"phantoms@Te-6", "simulate@Te-6", "fid", "evaluate"} <= rerun
    assert not rerun & {"phantoms@Te-1", "simulate@Te-1", "gan_train@cyclegan", "train_sam", "train_unet"}


def test_the_stand_in_is_made_before_sam_trains_and_feeds_its_zero_shot(pipeline: tuple[nx.DiGraph, dict[str, list[str]]]) -> None:
    graph, params = pipeline
    stand_in = "pretrain_sam@sam_small_pretrained"  # the embedded default's foundation
    assert stand_in in nx.descendants(graph, "train_sam")  # train_sam depends on models/foundation
    assert stand_in in nx.descendants(graph, "zero_shot@stand_in")
    assert "zero_shot@stand_in" in nx.descendants(graph, "report")  # a column of the report
    assert "sam.lora.rank" not in str(params[stand_in]) and "train.sam" not in str(params[stand_in])
