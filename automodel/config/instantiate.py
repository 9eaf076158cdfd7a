"""Builds objects from ``_target_`` nodes.

A ``_target_`` names a callable by dotted path. Only callables under an allowlist of module
prefixes resolve, so a config stays data rather than a way to run arbitrary code; a config
opts more prefixes in with a top-level ``allowed_target_prefixes: [mypkg.]``. Targets written
for NeMo AutoModel resolve through ``ALIASES``, an explicit table.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from automodel.config.loader import closest
from automodel.errors import UsageError

ALLOWED_PREFIXES = ("automodel.", "torch.", "transformers.", "peft.", "datasets.", "torchdata.")

# NeMo AutoModel target -> ours. The tutorial's config names the first three; configs written
# for NeMo AutoModel's current VLM recipe name the rest.
ALIASES = {
    "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained": (
        "automodel.models.AutoModelForImageTextToText.from_pretrained"
    ),
    "nemo_automodel.NeMoAutoModelForImageTextToText.from_pretrained": (
        "automodel.models.AutoModelForImageTextToText.from_pretrained"
    ),
    "nemo_automodel.datasets.vlm.CORD_v2": "automodel.datasets.vlm.make_cord_v2_dataset",
    "nemo_automodel.components.datasets.vlm.datasets.make_cord_v2_dataset": (
        "automodel.datasets.vlm.make_cord_v2_dataset"
    ),
    "nemo_automodel.datasets.vlm.datasets.make_cord_v2_dataset": (
        "automodel.datasets.vlm.make_cord_v2_dataset"
    ),
    "nemo_automodel.components.datasets.vlm.collate_fns.default_collate_fn": (
        "automodel.datasets.collate.default_collate_fn"
    ),
    "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy": (
        "automodel.loss.MaskedCrossEntropy"
    ),
    "nemo_automodel.components.training.rng.StatefulRNG": "automodel.training.rng.StatefulRNG",
    "nemo_automodel.components._peft.lora.PeftConfig": "automodel.peft.LoraConfig",
}


def resolve_target(name: Any, where: str, extra_prefixes: tuple[str, ...] = ()) -> Callable:
    """Imports the callable a ``_target_`` names.

    Args:
        name: the dotted path from the config.
        where: the config key holding it, for error messages.
        extra_prefixes: prefixes the config opted in to beyond ``ALLOWED_PREFIXES``.

    Raises:
        UsageError: the path is outside the allowlist or does not resolve.
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}._target_ must be a dotted path string, got {name!r}")
    name = ALIASES.get(name, name)
    if name.startswith("nemo_automodel."):
        raise UsageError(
            f"{where}._target_: {name} has no automodel equivalent yet; "
            f"known NeMo AutoModel targets: {', '.join(sorted(ALIASES))}"
        )
    allowed = ALLOWED_PREFIXES + tuple(extra_prefixes)
    if not name.startswith(allowed):
        raise UsageError(
            f"{where}._target_: {name} is outside the allowed modules ({', '.join(allowed)}); "
            "to trust it add its prefix to a top-level allowed_target_prefixes list"
        )
    parts = name.split(".")
    # Import the longest importable module prefix, then walk attributes (Class.method works).
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue
            raise
        for i, attr in enumerate(parts[split:], start=split):
            if attr.startswith("__"):
                raise UsageError(
                    f"{where}._target_: {name} names the private attribute {attr}; name a "
                    "public function or class"
                )
            if not hasattr(obj, attr):
                options = [a for a in dir(obj) if not a.startswith("_")]
                raise UsageError(
                    f"{where}._target_: {'.'.join(parts[:i])} has no attribute {attr!r}"
                    f"{closest(attr, options)}"
                )
            obj = getattr(obj, attr)
            _check_home(obj, name, where, allowed, strict=name.startswith(ALLOWED_PREFIXES))
        if not callable(obj):
            raise UsageError(f"{where}._target_: {name} is not callable")
        return obj
    raise UsageError(f"{where}._target_: cannot import {name} (is the package installed?)")


def _check_home(obj: Any, name: str, where: str, allowed: tuple[str, ...], strict: bool) -> None:
    """Refuses a path that leaves the allowed modules through an attribute: an allowed module's
    attribute may be another module (``torch.os``) or, under the built-in prefixes (``strict``),
    a function imported from one. Under a prefix the config opted in, only modules are checked:
    its functions may live in a C module of another name (``os.getcwd`` in ``posix``)."""
    if inspect.ismodule(obj):
        home, shown = obj.__name__, obj.__name__
    elif strict:
        home = getattr(obj, "__module__", None)
        shown = f"{home}.{getattr(obj, '__qualname__', '')}"
    else:
        return
    roots = {p.rstrip(".") for p in allowed}  # torch.zeros lives in the module torch itself
    if isinstance(home, str) and not home.startswith(allowed) and home not in roots:
        raise UsageError(
            f"{where}._target_: {name} leads to {shown}, outside the allowed modules "
            f"({', '.join(allowed)}); to trust it add its prefix to a top-level "
            "allowed_target_prefixes list"
        )


def is_target(node: Any) -> bool:
    return isinstance(node, dict) and "_target_" in node


def instantiate(node: dict, *args: Any, where: str = "", extra_prefixes=(), **kwargs: Any) -> Any:
    """Calls ``node['_target_']`` with the node's other keys as keyword arguments.

    Nested ``_target_`` nodes (in dicts or lists) are built first. Keyword arguments given here
    are runtime objects from the recipe (a model's parameters, a processor) and win over the
    config's. Strings such as ``torch.bfloat16`` become dtypes.

    Raises:
        UsageError: the target is not allowed, or rejects the given arguments.
    """
    target = resolve_target(node.get("_target_"), where or "config", extra_prefixes)
    params = {
        k: _build(v, f"{where}.{k}", extra_prefixes) for k, v in node.items() if k != "_target_"
    }
    params.update(kwargs)
    check_arguments(target, params, where, n_positional=len(args))
    return target(*args, **params)


def _build(value: Any, where: str, extra_prefixes) -> Any:
    if is_target(value):
        return instantiate(value, where=where, extra_prefixes=extra_prefixes)
    if isinstance(value, dict):
        return {k: _build(v, f"{where}.{k}", extra_prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v, f"{where}[{i}]", extra_prefixes) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("torch.") and value.count(".") == 1:
        import torch

        if isinstance(getattr(torch, value[6:], None), torch.dtype):
            return getattr(torch, value[6:])
    return value


def accepted_keywords(target: Callable) -> set[str] | None:
    """The keyword names a callable accepts, or None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            names.add(p.name)
    return names


def check_arguments(target: Callable, params: dict, where: str, n_positional: int = 0) -> None:
    """Raises UsageError naming the key when ``target`` cannot take ``params``."""
    accepted = accepted_keywords(target)
    if accepted is None:
        return
    for key in params:
        if key not in accepted:
            raise UsageError(
                f"{where}.{key}: {getattr(target, '__qualname__', target)} takes no argument "
                f"{key!r}{closest(key, accepted)}"
            )
