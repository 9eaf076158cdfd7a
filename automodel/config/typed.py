"""Typed config sections: a dataclass per plain section, its values checked when it is built.

A field is declared as ``field(default=..., metadata=doc(text, ge=..., le=...))``: its
annotation gives the type (``int``, ``float``, ``bool``, ``str``, ``list``, ``dict``, ``None``
in a union) and the choices (``Literal[...]``); ``ge`` / ``le`` bound a number; ``text`` is the
line the config reference prints. Building a ``Section`` (``from_dict`` or the constructor) checks every value and raises
``UsageError`` naming the key, the value and what it may be.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, ClassVar, Literal, Union

from automodel.config.loader import closest
from automodel.errors import UsageError

_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a section of keys",
    type(None): "null",
}


def doc(text: str, *, ge: float | None = None, le: float | None = None) -> dict[str, Any]:
    """A section field's metadata: its one-line description and an optional range."""
    return {"doc": text, "ge": ge, "le": le}


def alternatives(hint: Any) -> tuple:
    """The members of a union (``int | None`` -> ``(int, NoneType)``); a lone type as itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def choices_of(hint: Any) -> tuple:
    """The values a hint's ``Literal`` members allow (empty when it has none)."""
    return tuple(
        value
        for member in alternatives(hint)
        if typing.get_origin(member) is Literal
        for value in typing.get_args(member)
    )


def has_choices(hint: Any) -> bool:
    return bool(choices_of(hint))


def yaml_text(value: Any) -> str:
    """A value as one writes it in YAML: ``null``, ``true``, ``bf16``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def shown(value: Any) -> str:
    """A value in a message: strings quoted, the rest as YAML writes them (``true``, ``null``)."""
    return repr(value) if isinstance(value, (str, list, dict)) else yaml_text(value)


def _is_type(value: Any, kinds: tuple) -> bool:
    if value is None:
        return type(None) in kinds
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, tuple(k for k in kinds if isinstance(k, type) and k is not type(None)))


def _is_choice(value: Any, choices: tuple) -> bool:
    return any(value == c and type(value) is type(c) for c in choices)


def describe(hint: Any) -> str:
    """What a hint allows, in words: ``an integer or null``, ``one of drop, error``."""
    choices = choices_of(hint)
    kinds = [m for m in alternatives(hint) if typing.get_origin(m) is not Literal]
    names = [_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds]
    if choices:
        listed = ", ".join(yaml_text(c) for c in choices)
        names.insert(0, f"one of {listed}" if len(choices) > 1 else listed)
    return " or ".join(names)


def describe_range(ge: float | None, le: float | None) -> str:
    if ge is not None and le is not None:
        return f"{ge:g}" if ge == le else f"between {ge:g} and {le:g}"
    if ge is not None:
        return f"at least {ge:g}"
    return f"at most {le:g}" if le is not None else ""


def fix_hint(key: str) -> str:
    return f" (fix it in the YAML or with --{key}=VALUE)"


def check_value(value: Any, hint: Any, key: str, ge: float | None = None, le: float | None = None):
    """Checks one value against its annotation and range.

    Raises:
        UsageError: ``precision.autocast: 'bf61' is not one of auto, bf16, fp16, none``.
    """
    fix = fix_hint(key)
    kinds = tuple(m for m in alternatives(hint) if typing.get_origin(m) is not Literal)
    choices = choices_of(hint)
    if not (_is_type(value, kinds) or _is_choice(value, choices)):
        if choices:
            raise UsageError(f"{key}: {shown(value)} is not {describe(hint)}{fix}")
        raise UsageError(f"{key}={shown(value)} should be {describe(hint)}{fix}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and ((ge is not None and value < ge) or (le is not None and value > le)):
        raise UsageError(f"{key}: {shown(value)} must be {describe_range(ge, le)}{fix}")


class Section:
    """Base of a plain config section (a dataclass); ``section`` is its key in the YAML.

    A subclass marked ``optional`` is built only when the YAML has it (its presence turns
    something on, as ``wandb`` does); the others are always built, from their defaults.
    """

    section: ClassVar[str]
    optional: ClassVar[bool] = False

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_value(
                value, hints[f.name], f"{self.section}.{f.name}", f.metadata["ge"], f.metadata["le"]
            )

    @classmethod
    def from_dict(cls, node: Any):
        """Builds the section from its YAML mapping; missing keys take their defaults.

        Raises:
            UsageError: ``node`` is not a mapping, a key is unknown (with the closest names) or
                a value is invalid.
        """
        if not isinstance(node, dict):
            raise UsageError(f"{cls.section} must be a section of keys, got {node!r}")
        keys = [f.name for f in dataclasses.fields(cls)]
        for key in node:
            if key not in keys:
                raise UsageError(
                    f"unknown key {cls.section}.{key}{closest(str(key), keys)}; "
                    f"valid keys: {', '.join(keys)}"
                )
        return cls(**node)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def literal_parameters(target: Any) -> dict[str, Any]:
    """The parameters of a callable annotated with ``Literal`` choices, mapped to their hint.

    Annotations that cannot be evaluated are skipped: only enumerated values are checked here;
    the rest of a ``_target_``'s keys are checked against its signature alone.
    """
    fn = target.__init__ if isinstance(target, type) else target
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    found = {}
    for name, parameter in parameters.items():
        hint = parameter.annotation
        if isinstance(hint, str):
            try:
                hint = eval(hint, dict(namespace))  # the module's own annotation text
            except (NameError, AttributeError, SyntaxError, TypeError):
                continue
        if hint is not inspect.Parameter.empty and has_choices(hint):
            found[name] = hint
    return found
