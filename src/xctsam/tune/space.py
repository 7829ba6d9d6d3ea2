"""The search space of params `tune.space`: dotted params keys drawn by an Optuna trial.

Any key of params.yaml can be searched without code changes; a key that does not exist is
refused up front with its `tune.space.<key>` path, before any trial is spent on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xctsam.config.params import Params, parse_params
from xctsam.config.tune import SearchDimension
from xctsam.params_file import assign
from xctsam.util.errors import ConfigError


def _exists(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_keys(params: Params, source: Path | str) -> None:
    """Every key of tune.space and tune.trial must name an existing params value."""
    tree = params.model_dump(mode="json")
    for section, keys in (("tune.space", params.tune.space), ("tune.trial", params.tune.trial)):
        for key in keys:
            if key.startswith("tune.") or not _exists(tree, key):
                raise ConfigError(source, f"{section}.{key}", "no such params key; use a dotted path such as sam.lora.rank")


def suggest(trial: Any, space: Mapping[str, SearchDimension]) -> dict[str, Any]:
    """Draw one value per key with the trial's sampler; Optuna records them under the key's name."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dim.choices or []))
        elif dim.type == "float":
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
        else:
            values[key] = trial.suggest_int(key, int(dim.low or 0), int(dim.high or 0), log=dim.log, step=int(dim.step or 1))
    return values


def apply_values(params: Params, values: Mapping[str, Any], source: Path | str = "tune") -> Params:
    """A copy of `params` with dotted keys set, validated like params.yaml itself.

    A combination the schema refuses (e.g. experts below top_k) is a ConfigError naming the key.
    """
    tree = params.model_dump(mode="json")
    for key, value in values.items():
        assign(tree, key, value, source)
    return parse_params(tree, source)
