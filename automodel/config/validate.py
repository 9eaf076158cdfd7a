"""Checks a whole config against what a recipe reads, before anything slow happens.

A recipe describes its config as a ``Schema``: sections built from a ``_target_`` (their keys
are checked against the target's signature) and plain sections (their keys and value types are
listed). Every problem names the key, the override to change and the closest valid names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from automodel.config.instantiate import accepted_keywords, is_target, resolve_target
from automodel.config.loader import closest
from automodel.errors import UsageError


@dataclass
class Schema:
    """What a recipe reads.

    Attributes:
        targets: sections built from a ``_target_``, mapped to whether they are required.
        plain: plain sections, mapped to ``{key: type or tuple of types}``.
        noticed: sections accepted but not acted on, mapped to the notice printed for them.
        top_level: top-level scalar keys and their types.
    """

    targets: dict[str, bool]
    plain: dict[str, dict[str, Any]]
    noticed: dict[str, str] = field(default_factory=dict)
    top_level: dict[str, Any] = field(default_factory=dict)

    def sections(self) -> set[str]:
        return set(self.targets) | set(self.plain) | set(self.noticed) | set(self.top_level)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _type_ok(value: Any, expected: Any) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if value is None:
        return type(None) in expected
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, tuple(t for t in expected if t is not type(None)))


def _describe(expected: Any) -> str:
    expected = expected if isinstance(expected, tuple) else (expected,)
    names = [_TYPE_NAMES.get(t, "null" if t is type(None) else t.__name__) for t in expected]
    return " or ".join(names)


def validate_config(cfg: dict, schema: Schema) -> list[str]:
    """Checks every section and key of ``cfg``.

    Returns:
        The notices for accepted-but-unused sections, for the caller to print.

    Raises:
        UsageError: the first problem found, naming the key and the fix.
    """
    extra = tuple(cfg.get("allowed_target_prefixes") or ())
    for name in cfg:
        if name not in schema.sections():
            raise UsageError(
                f"unknown config section {name!r}{closest(name, schema.sections())}; "
                f"known sections: {', '.join(sorted(schema.sections()))}"
            )
    for name, required in schema.targets.items():
        node = cfg.get(name)
        if node is None:
            if required:
                raise UsageError(
                    f"the config has no {name!r} section with a _target_ (it is required)"
                )
            continue
        _check_target_node(node, name, extra)
    for name, keys in schema.plain.items():
        node = cfg.get(name)
        if node is None:
            continue
        if not isinstance(node, dict):
            raise UsageError(f"{name} must be a section of keys, got {node!r}")
        for key, value in node.items():
            if key not in keys:
                raise UsageError(
                    f"unknown key {name}.{key}{closest(key, keys)}; valid keys: {', '.join(keys)}"
                )
            if not _type_ok(value, keys[key]):
                raise UsageError(
                    f"{name}.{key}={value!r} should be {_describe(keys[key])} "
                    f"(fix it in the YAML or with --{name}.{key}=VALUE)"
                )
    for key, expected in schema.top_level.items():
        if key in cfg and not _type_ok(cfg[key], expected):
            raise UsageError(f"{key}={cfg[key]!r} should be {_describe(expected)}")
    return [f"note: {schema.noticed[n]}" for n in cfg if n in schema.noticed]


def _check_target_node(node: Any, where: str, extra: tuple[str, ...]) -> None:
    if not is_target(node):
        raise UsageError(
            f"{where} needs a _target_ naming what to build, e.g. {where}._target_: ..."
        )
    target = resolve_target(node["_target_"], where, extra)
    accepted = accepted_keywords(target)
    for key, value in node.items():
        if key == "_target_":
            continue
        if accepted is not None and key not in accepted:
            raise UsageError(
                f"unknown key {where}.{key}: {getattr(target, '__qualname__', target)} takes no "
                f"argument {key!r}{closest(key, accepted)}"
            )
        if is_target(value):
            _check_target_node(value, f"{where}.{key}", extra)
