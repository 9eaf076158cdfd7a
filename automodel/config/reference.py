"""The config reference (``docs/config.md``), written from a recipe's ``Schema``.

Plain sections come from their dataclasses (docstring, fields, types, ranges, defaults); the
``_target_`` sections and top-level keys from ``Schema.docs``. A test regenerates the page and
compares it with the committed file.
"""

from __future__ import annotations

import dataclasses
import typing

from automodel.config.typed import Section, alternatives, choices_of, describe_range, yaml_text
from automodel.config.validate import Schema

_SHORT = {int: "int", float: "number", bool: "bool", str: "string", list: "list", dict: "mapping"}


def type_text(hint: typing.Any, ge: float | None, le: float | None) -> str:
    """``int, at least 1, or null``; ``one of `auto`, `bf16```."""
    members = [m for m in alternatives(hint) if typing.get_origin(m) is not typing.Literal]
    nullable = type(None) in members
    parts = [_SHORT.get(m, getattr(m, "__name__", str(m))) for m in members if m is not type(None)]
    choices = choices_of(hint)
    if choices:
        listed = ", ".join(f"`{yaml_text(c)}`" for c in choices)
        parts.insert(0, f"one of {listed}" if len(choices) > 1 else listed)
    text = " or ".join(parts)
    if ge is not None and ge == le:
        text = f"`{ge:g}`"
    elif ge is not None or le is not None:
        text += f", {describe_range(ge, le)}"
    return f"{text}, or null" if nullable else text


def section_table(section: type[Section]) -> list[str]:
    hints = typing.get_type_hints(section)
    doc = " ".join((section.__doc__ or "").split())
    lines = [f"## `{section.section}`", "", doc, ""]
    if section.optional:
        lines += ["Present in the config: on. Absent: off.", ""]
    lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(section):
        kind = type_text(hints[f.name], f.metadata["ge"], f.metadata["le"])
        default = f"`{yaml_text(f.default)}`"
        lines.append(f"| `{f.name}` | {kind} | {default} | {f.metadata['doc']} |")
    return [*lines, ""]


def render(schema: Schema, command: str) -> str:
    """The whole page, in Markdown.

    Args:
        schema: the recipe's schema.
        command: the command that writes the page (printed at its top).
    """
    lines = [
        "# Config reference",
        "",
        (
            f"<!-- Written by `{command}` from automodel/config/sections.py and the recipe's "
            "schema; edit those, then rerun it. -->"
        ),
        "",
        (
            "A config is YAML. `automodel validate -c cfg.yaml` (and the start of every run) "
            "checks every section, key and value below before any model or data loads, and names "
            "the key, the value and what it may be. Any key can be overridden on the command "
            "line: `--section.key=value` or `--section.key value`; `~section.key` deletes one."
        ),
        "",
        "## Sections built from a `_target_`",
        "",
        (
            "Each names a callable by its dotted path; its other keys are that callable's "
            "arguments, checked against its signature (and, where it lists its choices, against "
            "them)."
        ),
        "",
        "| section | what it holds |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {schema.docs[name]} |" for name in schema.targets]
    lines += [
        "",
        (
            "`_target_` resolves only under `automodel.`, `torch.`, `transformers.`, `peft.`, "
            "`datasets.` and `torchdata.`; a config trusts more with a top-level "
            "`allowed_target_prefixes: [mypkg.]`."
        ),
        "",
        "## Top-level keys",
        "",
        "| key | what it holds |",
        "|---|---|",
    ]
    lines += [f"| `{key}` | {schema.docs[key]} |" for key in schema.top_level]
    lines.append("")
    if schema.noticed:
        lines += ["Sections accepted and not used (a run prints a note for each):", ""]
        lines += [
            f"- `{name}`: {notice.removeprefix(name + ': ')}"
            for name, notice in schema.noticed.items()
        ]
        lines.append("")
    for section in schema.plain.values():
        lines += section_table(section)
    return "\n".join(lines)
