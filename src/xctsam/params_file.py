"""Change values in params.yaml in place, keeping every other character of the file.

`xctsam tune apply` writes a search's best values back so the next `dvc repro` trains with
them; whoever reads params.yaml afterwards should find their own file with a few values
changed. A round-trip through a YAML library re-serialises the document (ruamel.yaml keeps
comments but drops aligned keys and turns `null` into an empty value), so the edit is textual:
PyYAML's composer gives each value node's exact span in the text, and only those spans are
replaced. The result is validated as `load_params` would before it replaces the file.
`xctsam params apply FILE` sets every dotted key a file lists (e.g. configs/real-samgan.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import yaml

from xctsam.config.params import load_params, parse_params
from xctsam.util import safe_yaml
from xctsam.util.atomic import write_text_atomic
from xctsam.util.errors import ConfigError, InputError


def assign(mapping: MutableMapping[str, Any], dotted: str, value: Any, source: Path | str) -> None:
    """mapping['a']['b']['c'] = value for 'a.b.c', creating missing levels.

    A level that exists but is not a mapping cannot hold the key: a ConfigError naming it.
    Whether the key is allowed at all is the params schema's call (validated afterwards).
    """
    *parents, leaf = dotted.split(".")
    node = mapping
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, MutableMapping):
            raise ConfigError(source, dotted, f"'{'.'.join(walked)}' is a value, not a section")
        node = child
    node[leaf] = value


def yaml_scalar(value: Any) -> str:
    """`value` as YAML flow text: 8, 0.00123, true, null, [1, 2], 'a: b'."""
    return yaml.safe_dump(value, default_flow_style=True, width=4096).removesuffix("\n").removesuffix("\n...").strip()


def _key_and_value(root: yaml.Node, dotted: str, source: Path) -> tuple[yaml.Node, yaml.Node]:
    node: yaml.Node = root
    key_node: yaml.Node = root
    for depth, part in enumerate(dotted.split(".")):
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(source, dotted, f"'{'.'.join(dotted.split('.')[:depth])}' is a value, not a section")
        found = next(((key, value) for key, value in node.value if key.value == part), None)
        if found is None:
            raise ConfigError(source, dotted, "not written in the params file; add the key there (with its current value) first")
        key_node, node = found
    return key_node, node


def _content_end(node: yaml.Node) -> int:
    """Where a node's own text ends: a block's last item, not the comments after it."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _content_end(last[1] if isinstance(node, yaml.MappingNode) else last)
    return node.end_mark.index


def _replacement(key: yaml.Node, value: yaml.Node, new_value: Any) -> tuple[int, int, str]:
    """(start, end, text) replacing one value in place.

    A single value or [flow, list] is replaced where it stands, keeping the spacing around it.
    A block section or list is replaced from its key's colon to its last item, written in flow
    style on the key's line; the comments after its last item stay.
    """
    if isinstance(value, yaml.ScalarNode) or value.flow_style:
        return value.start_mark.index, value.end_mark.index, yaml_scalar(new_value)
    return key.end_mark.index, _content_end(value), ": " + yaml_scalar(new_value)


def _lookup(mapping: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        mapping = mapping[part]
    return mapping


def update_params_file(path: Path | str, updates: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (e.g. {"sam.lora.rank": 8}) in the params file at `path`.

    Returns {key: previous value}. Nothing is written when a key is missing or the result
    would not load (ConfigError naming the key); the file is replaced atomically.
    """
    path = Path(path)
    load_params(path)  # the file must load before it is edited (one clear line otherwise)
    text = path.read_text()
    root = safe_yaml.compose(text, path)
    previous: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []
    current = safe_yaml.load(text, path)
    for key, value in updates.items():
        key_node, value_node = _key_and_value(root, key, path)
        previous[key] = _lookup(current, key)
        spans.append(_replacement(key_node, value_node, value))
    for start, end, replacement in sorted(spans, reverse=True):  # from the end: earlier offsets stay valid
        text = text[:start] + replacement + text[end:]
    parse_params(safe_yaml.load(text, path), path)
    write_text_atomic(path, text)
    return previous


def read_overlay(path: Path | str) -> dict[str, Any]:
    """A params overlay: a YAML mapping of dotted params keys to the values they take."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "params overlay not found", "give a YAML file of dotted keys, e.g. configs/real-samgan.yaml")
    overlay = safe_yaml.load(path.read_text(), path)
    if not isinstance(overlay, dict) or not overlay or not all(isinstance(key, str) for key in overlay):
        raise InputError(path, "not a mapping of dotted params keys to values", "write lines like `sam.lora.rank: 8`")
    return overlay


def apply_overlay(params_path: Path | str, overlay_path: Path | str) -> dict[str, tuple[Any, Any]]:
    """Set every key of the overlay in the params file; returns {key: (before, after)}."""
    overlay = read_overlay(overlay_path)
    previous = update_params_file(params_path, overlay)
    return {key: (previous[key], value) for key, value in overlay.items()}
