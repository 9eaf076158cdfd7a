"""Checks a whole config against what a recipe reads, before anything slow happens.

A recipe describes its config as a ``Schema``: sections built from a ``_target_`` (their keys
are checked against the target's signature, and values of ``Literal``-annotated parameters
against their choices) and plain sections (a ``Section`` dataclass each, see ``typed.py``).
Every problem names the key, the value, the override to change and the closest valid names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from automodel.config.instantiate import accepted_keywords, is_target, resolve_target
from automodel.config.loader import closest
from automodel.config.typed import Section, check_value, literal_parameters
from automodel.errors import UsageError


@dataclass
class Schema:
    """What a recipe reads.

    Attributes:
        targets: sections built from a ``_target_``, mapped to whether they are required.
        plain: plain sections, mapped to their ``Section`` dataclass.
        noticed: sections accepted but not acted on, mapped to the notice printed for them.
        top_level: top-level keys and their types.
        target_lists: top-level keys holding a list of ``_target_`` calls (each is checked as a
            target section is).
        docs: a line for each target section and top-level key (the config reference's).
    """

    targets: dict[str, bool]
    plain: dict[str, type[Section]]
    noticed: dict[str, str] = field(default_factory=dict)
    top_level: dict[str, Any] = field(default_factory=dict)
    docs: dict[str, str] = field(default_factory=dict)
    target_lists: tuple[str, ...] = ()

    def sections(self) -> set[str]:
        return set(self.targets) | set(self.plain) | set(self.noticed) | set(self.top_level)


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
    for name, section in schema.plain.items():
        if cfg.get(name) is not None:
            section.from_dict(cfg[name])
    for key, expected in schema.top_level.items():
        if key in cfg:
            check_value(cfg[key], expected, key)
    for key in schema.target_lists:
        for i, node in enumerate(cfg.get(key) or []):
            _check_target_node(node, f"{key}[{i}]", extra)
    return [f"note: {schema.noticed[n]}" for n in cfg if n in schema.noticed]


def _check_target_node(node: Any, where: str, extra: tuple[str, ...]) -> None:
    if not is_target(node):
        raise UsageError(
            f"{where} needs a _target_ naming what to build, e.g. {where}._target_: ..."
        )
    target = resolve_target(node["_target_"], where, extra)
    accepted = accepted_keywords(target)
    enumerated = literal_parameters(target)
    for key, value in node.items():
        if key == "_target_":
            continue
        if accepted is not None and key not in accepted:
            raise UsageError(
                f"unknown key {where}.{key}: {getattr(target, '__qualname__', target)} takes no "
                f"argument {key!r}{closest(key, accepted)}"
            )
        if key in enumerated:
            check_value(value, enumerated[key], f"{where}.{key}")
        if is_target(value):
            _check_target_node(value, f"{where}.{key}", extra)
