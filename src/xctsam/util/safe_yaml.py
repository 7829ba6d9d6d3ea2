"""Reading params-like YAML: PyYAML's safe loader, minus what it lets pass silently or at great cost.

Refused with the file and the dotted key (the first two before anything is constructed):
  - a key written twice in one mapping: PyYAML keeps the last one without a word, so the
    value a reader of the file sees first is not the one that trains;
  - aliases that expand past MAX_ALIAS_NODES values, or an alias inside the section it names:
    a "billion laughs" file of a few hundred bytes composes to a few nodes but expands to
    billions of list items as soon as anything walks it (a dump, a copy, a validation);
  - NaN and infinite numbers (`.nan`, `.inf`, `1.0e+999`), anywhere, `tune.trial` included:
    no params value means them, and a learning rate of inf trains a model of NaNs.

The composed node graph shares every aliased node, so its size is counted without expanding it:
each node once, plus, per alias, the expanded size of what it names (memoised per node).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from xctsam.util.errors import ConfigError, InputError

MAX_ALIAS_NODES = 10_000  # values aliases may add in all; a hand-written params file needs a handful
MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *defaults`: a key whose values may be overridden


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "?"


def _children(node: yaml.Node, path: str) -> Iterator[tuple[str, yaml.Node]]:
    """(dotted path, node) of every key and value directly inside `node`."""
    join = f"{path}." if path else ""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield f"{join}{_key_text(key)}", key
            yield f"{join}{_key_text(key)}", value
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield f"{join}{index}", item


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _walk(root: yaml.Node) -> Iterator[tuple[str, yaml.Node, bool]]:
    """(dotted path, node, seen before) in document order; a node seen before (an alias) is not entered again."""
    seen: set[int] = set()
    pending = [("", root)]
    while pending:
        path, node = pending.pop()
        repeated = id(node) in seen
        yield path, node, repeated
        if not repeated:
            seen.add(id(node))
            pending.extend(reversed(list(_children(node, path))))


# ---------------------------------------------------------------- duplicate keys
def _refuse_duplicate_keys(root: yaml.Node, source: Path | str) -> None:
    """Each mapping's scalar keys must be distinct (a merge key `<<` may be overridden)."""
    for path, node, repeated in _walk(root):
        if repeated or not isinstance(node, yaml.MappingNode):
            continue
        first_line: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
                continue
            identity = (key.tag, key.value)
            if identity in first_line:
                dotted = f"{path}.{key.value}" if path else key.value
                raise ConfigError(source, dotted, f"written twice in one section (lines {first_line[identity]} and {_line(key)}); keep one")
            first_line[identity] = _line(key)


# ---------------------------------------------------------------- alias expansion
class _ExpandedSize:
    """Expanded node counts (an alias counted as what it names), memoised; refuses cycles."""

    def __init__(self, source: Path | str) -> None:
        self.source = source
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()  # nodes being counted: meeting one again is a cycle

    def __call__(self, node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise ConfigError(self.source, path, "a YAML alias inside the section it names (an endless value)")
        self.open.add(key)
        size = 1 + sum(self(child, child_path) for child_path, child in _children(node, path))
        self.open.discard(key)
        self.sizes[key] = size
        return size


def _refuse_alias_expansion(root: yaml.Node, source: Path | str) -> None:
    """Every alias adds the expanded size of what it names to a budget of MAX_ALIAS_NODES."""
    size = _ExpandedSize(source)
    size(root, "")  # counts every node once, and refuses an alias inside its own section
    added = 0
    for path, node, repeated in _walk(root):
        if repeated:
            added += size(node, path)
            if added > MAX_ALIAS_NODES:
                raise ConfigError(source, path or "<top>", f"YAML aliases expand to more than {MAX_ALIAS_NODES} values; write the values out")


# ---------------------------------------------------------------- non-finite numbers
def _first_non_finite(tree: Any, path: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or infinite float in nested mappings and lists, or None."""
    if isinstance(tree, float):
        return None if math.isfinite(tree) else (path, tree)
    if isinstance(tree, Mapping):
        items = ((str(key), value) for key, value in tree.items())
    elif isinstance(tree, (list, tuple)):
        items = ((str(index), value) for index, value in enumerate(tree))
    else:
        return None
    for name, value in items:
        found = _first_non_finite(value, f"{path}.{name}" if path else name)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- loading
def _unreadable(exc: yaml.YAMLError, source: Path | str) -> InputError:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return InputError(source, f"not valid YAML{where}", "fix the syntax")


def compose(text: str, source: Path | str) -> yaml.Node | None:
    """The document's node graph (None for an empty one), checked for duplicate keys and alias bombs."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise _unreadable(exc, source) from None
    except RecursionError:
        raise InputError(source, "YAML nested too deeply to read", "flatten the document") from None
    if root is not None:
        _refuse_duplicate_keys(root, source)
        _refuse_alias_expansion(root, source)
    return root


def load(text: str, source: Path | str) -> Any:
    """yaml.safe_load of `text`, refusing what the module docstring lists; `source` names the file."""
    root = compose(text, source)
    if root is None:
        return None
    try:
        data = yaml.SafeLoader("").construct_document(root)
    except yaml.YAMLError as exc:  # e.g. a !!python/object tag, which the safe loader does not build
        raise _unreadable(exc, source) from None
    found = _first_non_finite(data)
    if found is not None:
        key, value = found
        raise ConfigError(source, key or "<top>", f"must be a finite number, got {value}")
    return data
