"""YAML loading, ``${ENV}`` interpolation and dotted command-line overrides.

A config is plain nested dicts and lists. Nothing here imports a target: building objects is
``instantiate.py``'s job, and checking keys against what the recipe reads is ``validate.py``'s.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from automodel.errors import UsageError


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float.

    YAML 1.1 wants a dot in the mantissa (``1.0e-5``); without this resolver the tutorial's
    ``lr: 1e-5`` would arrive as the string "1e-5".
    """


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    """A mapping that refuses a key written twice (YAML would keep the last one silently).

    Keys merged in from an anchor (``<<: *base``) may be overridden: only written keys count.
    """
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                problem=f"the key {key!r} is written twice in one section; keep one",
                problem_mark=key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_scalar(text: str) -> Any:
    """Parses one command-line or environment value as a YAML scalar ("3" -> 3, "1e-5" -> 1e-5)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def load_yaml(path: str | Path) -> dict:
    """Reads a config file.

    Raises:
        UsageError: the file is missing, unreadable, not valid YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path} (pass an existing YAML with -c)")
    try:
        cfg = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{where}: invalid YAML: {problem}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise UsageError(
            f"{path}: the top level must be a mapping of sections, got {type(cfg).__name__}"
        )
    return cfg


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:,([^}]*))?\}")


def interpolate_env(node: Any, path: str = "") -> Any:
    """Replaces ``${VAR}`` and ``${VAR,default}`` in every string of a config.

    A string that is exactly one reference takes the value's YAML type (``${STEPS,10}`` -> 10).

    Raises:
        UsageError: a variable is unset and has no default.
    """
    if isinstance(node, dict):
        return {k: interpolate_env(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_env(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def value(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default.strip()
        raise UsageError(
            f"{path}: environment variable {name} is not set "
            f"(export it, or write ${{{name},default}} in the config)"
        )

    whole = _ENV.fullmatch(node)
    if whole:
        return parse_scalar(value(whole))
    if "${" in _ENV.sub("", node):
        raise UsageError(
            f"{path}: {node!r} has a malformed ${{...}} reference; write ${{VAR}} or "
            "${VAR,default} (VAR: letters, digits and _, not starting with a digit)"
        )
    return _ENV.sub(value, node)


@dataclass(frozen=True)
class Override:
    """One command-line change: set ``key`` to ``value``, or delete it when ``delete``."""

    key: str
    value: Any = None
    delete: bool = False

    def __str__(self) -> str:
        return f"~{self.key}" if self.delete else f"--{self.key}"


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z0-9_\-]+)*$")


def parse_overrides(args: list[str]) -> list[Override]:
    """Parses ``--a.b=v``, ``--a.b v`` and ``~a.b`` into overrides.

    Raises:
        UsageError: an argument is not one of those forms or a value is missing.
    """
    out: list[Override] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("~"):
            key = arg[1:]
            _check_key(key, arg)
            out.append(Override(key, delete=True))
            i += 1
            continue
        if not arg.startswith("--"):
            raise UsageError(
                f"unexpected argument {arg!r}: overrides look like --a.b=value, --a.b value or ~a.b"
            )
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
            i += 1
        else:
            key = body
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise UsageError(f"override {arg} has no value: write {arg}=VALUE or {arg} VALUE")
            raw = args[i + 1]
            i += 2
        _check_key(key, arg)
        out.append(Override(key, parse_scalar(raw)))
    return out


def _check_key(key: str, arg: str) -> None:
    if not _KEY.match(key):
        raise UsageError(
            f"bad override {arg!r}: the key must be dotted names like step_scheduler.max_steps"
        )


def closest(name: str, options: list[str] | set[str]) -> str:
    """A ' (did you mean: x, y?)' hint, or '' when nothing is close."""
    near = difflib.get_close_matches(name, sorted(options), n=3, cutoff=0.5)
    return f" (did you mean: {', '.join(near)}?)" if near else ""


def apply_overrides(cfg: dict, overrides: list[Override]) -> dict:
    """Returns a copy of ``cfg`` with the overrides applied; the caller's dict is untouched.

    Setting a key whose section does not exist creates the section: whether the key is one the
    recipe reads is decided by ``validate_config`` afterwards, which can also check new keys.
    A new value must have the type of the value it replaces (an int may become a float).

    Raises:
        UsageError: a deleted key does not exist, a path runs through a non-mapping, or a value
            has the wrong type.
    """
    cfg = copy.deepcopy(cfg)
    for ov in overrides:
        *parents, leaf = ov.key.split(".")
        node = cfg
        walked = []
        for part in parents:
            walked.append(part)
            child = node.get(part)
            if child is None and not ov.delete:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(walked)
                if child is None:
                    raise UsageError(
                        f"{ov}: there is no section {where}{closest(part, node.keys())}"
                    )
                raise UsageError(f"{ov}: {where} is a {type(child).__name__}, not a section")
            node = child
        if ov.delete:
            if leaf not in node:
                raise UsageError(
                    f"{ov}: there is no key {ov.key} to delete{closest(leaf, node.keys())}"
                )
            del node[leaf]
            continue
        if leaf in node:
            _check_same_type(ov, node[leaf])
        node[leaf] = ov.value
    return cfg


def _check_same_type(ov: Override, old: Any) -> None:
    new = ov.value
    if old is None or new is None:
        return
    if isinstance(old, bool) or isinstance(new, bool):
        ok = isinstance(old, bool) == isinstance(new, bool)
    elif isinstance(old, (int, float)):
        ok = isinstance(new, (int, float))
    elif isinstance(old, dict):
        ok = isinstance(new, dict)
    elif isinstance(old, list):
        ok = isinstance(new, list)
    else:
        ok = True  # strings may become anything a YAML scalar can be; targets check further
    if not ok:
        raise UsageError(
            f"{ov}={new}: {ov.key} expects a {_type_name(old)} (it is {old!r} in the config)"
        )


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean (true/false)"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "section", list: "list"}.get(type(value), type(value).__name__)


def load_config(path: str | Path, overrides: list[Override] | None = None) -> dict:
    """Loads a YAML file, applies overrides, then interpolates environment variables."""
    cfg = load_yaml(path)
    cfg = apply_overrides(cfg, overrides or [])
    return interpolate_env(cfg)


def dump_yaml(cfg: dict) -> str:
    """The config as YAML text, keys in their original order."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=100)
