"""Which real volumes re-fine-tuning trains on, and which are held out to measure forgetting.

Forgetting is measured on `evaluation_volumes`: every labelled volume of `eval.splits` not named
in `finetune.volumes` (a split with none left is not scored). The unit is the volume, not the
slice: 2.5D tiles read their neighbours, and both fine-tuned variants must be scored on the same
data. `check_no_overlap` refuses a fine-tuning volume among the evaluation volumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from xctsam.data.datasets import SliceRef
from xctsam.eval.evaluate import eval_split_dirs, labelled_volumes
from xctsam.util.errors import ConfigError, InputError

PARAMS_KEY = "finetune.volumes"


def finetune_volume_paths(volumes: Mapping[str, Sequence[str]], data_root: Path) -> dict[str, list[Path]]:
    """{split folder: [volume path]} of `volumes` (finetune.volumes); a missing file is an InputError."""
    found: dict[str, list[Path]] = {}
    for folder, names in volumes.items():
        paths = [Path(data_root) / folder / name for name in names]
        for path in paths:
            if not path.is_file():
                raise InputError(
                    path,
                    f"fine-tuning volume named in params {PARAMS_KEY} not found",
                    "name an existing volume file of that split folder",
                )
        found[folder] = paths
    return found


def _same_file_key(path: Path) -> Path:
    # resolved, so a volume reached through a symlink or '..' still counts as the same volume
    return Path(path).resolve()


def evaluation_volumes(finetune_volumes: Mapping[str, Sequence[str]], splits: Sequence[str], data_root: Path) -> dict[str, list[Path]]:
    """{split folder: [labelled volume path]} of `splits` (eval.splits), minus every volume of
    `finetune_volumes` (finetune.volumes).

    A split whose every volume is fine-tuned on is left out (a release with one scan per split
    fine-tunes on whole splits and measures forgetting on the others); none left is refused.
    """
    tuned = {
        _same_file_key(path)
        for paths in finetune_volume_paths(finetune_volumes, data_root).values()
        for path in paths
    }
    eval_split_dirs(splits, data_root)  # unique split names, labelled folders
    remaining: dict[str, list[Path]] = {}
    for folder in splits:
        kept = [
            path
            for path in labelled_volumes(Path(data_root) / folder)
            if _same_file_key(path) not in tuned
        ]
        if kept:
            remaining[folder] = kept
    if not remaining:
        raise ConfigError(
            "params",
            PARAMS_KEY,
            "takes every labelled volume of eval.splits: none is left to measure forgetting on",
        )
    return remaining


def check_no_overlap(
    finetune_volumes: Iterable[Path | SliceRef], eval_volumes: Mapping[str, Sequence[Path]]
) -> None:
    """ConfigError naming the first fine-tuning volume (or slice's volume) that is also evaluated."""
    evaluated = {
        _same_file_key(path): folder for folder, paths in eval_volumes.items() for path in paths
    }
    for item in finetune_volumes:
        volume = item.volume if isinstance(item, SliceRef) else Path(item)
        folder = evaluated.get(_same_file_key(volume))
        if folder is not None:
            raise ConfigError(
                "params",
                PARAMS_KEY,
                f"{volume} is used for fine-tuning and is also evaluated in {folder}; fine-tuning and evaluation volumes must differ",
            )
