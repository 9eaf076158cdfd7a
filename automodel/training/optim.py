"""The optimizer, with per-parameter-group settings (e.g. a lower learning rate for the vision tower).

An ``optimizer`` section may carry ``param_groups``: a list of ``{match: REGEX, <option>: value}``
entries. Each trainable parameter joins the first entry whose ``match`` is found in its name
(``re.search``) and takes that entry's options (``lr``, ``weight_decay``, ``betas`` ...) in
place of the section's; parameters no entry matches keep the section's own options. This is
the ``params`` list of dicts that every ``torch.optim`` optimizer accepts.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from automodel.config.instantiate import (
    check_arguments,
    instantiate,
    resolve_target,
)
from automodel.errors import UsageError

PARAM_GROUPS_KEY = "param_groups"

# Optimizers that get ``fused=True`` unless the config sets ``fused`` or ``foreach``: one kernel
# updates each parameter, where the default CPU loop allocates parameter-sized temporaries (0.5
# GB a step for a 262k-token embedding).
_FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW)
_FUSED_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def param_groups(model: nn.Module, specs: list[dict] | None, where: str = "optimizer") -> list:
    """Splits the model's trainable parameters into optimizer parameter groups.

    Args:
        model: the model to optimise; frozen parameters (``requires_grad=False``) are left out.
        specs: ``[{match: REGEX, **options}, ...]``; ``None`` or empty gives one group.
        where: the config path named in errors.

    Returns:
        The trainable parameters as a list (no specs), or a list of ``{"params": [...], **options}``
        dicts: first the parameters no spec matched (with the optimizer's own options), then
        one group per spec, in the order given.

    Raises:
        UsageError: a spec is not a mapping, has no ``match``, has an invalid regex, or matches no
            trainable parameter.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not specs:
        return [p for _, p in named]
    if not isinstance(specs, list):
        raise UsageError(f"{where}.{PARAM_GROUPS_KEY} must be a list of {{match: REGEX, ...}}")
    patterns = []
    for i, spec in enumerate(specs):
        key = f"{where}.{PARAM_GROUPS_KEY}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("match"), str):
            raise UsageError(f"{key} needs a match: REGEX key (a parameter-name pattern)")
        if "params" in spec:
            raise UsageError(f"{key}: params is chosen by match; remove the params key")
        try:
            patterns.append(re.compile(spec["match"]))
        except re.error as err:
            raise UsageError(f"{key}.match={spec['match']!r} is not a valid regex: {err}") from err
    rest: list[nn.Parameter] = []
    grouped: list[list[nn.Parameter]] = [[] for _ in specs]
    for name, p in named:
        index = next((i for i, pat in enumerate(patterns) if pat.search(name)), None)
        (rest if index is None else grouped[index]).append(p)
    for i, params in enumerate(grouped):
        if not params:
            raise UsageError(
                f"{where}.{PARAM_GROUPS_KEY}[{i}].match={specs[i]['match']!r} matches no trainable "
                "parameter (an earlier entry may have taken them, or they are frozen); fix the "
                "pattern or drop the entry"
            )
    groups = [{"params": rest}] if rest else []
    for spec, params in zip(specs, grouped, strict=True):
        options = {k: tuple(v) if k == "betas" else v for k, v in spec.items() if k != "match"}
        groups.append({"params": params, **options})
    return groups


def build_optimizer(
    node: dict, model: nn.Module, **instantiate_kwargs: Any
) -> torch.optim.Optimizer:
    """Builds the config's optimizer over the model's trainable parameters.

    Args:
        node: the ``optimizer`` section (``_target_``, options and optional ``param_groups``).
        model: the model to optimise.
        **instantiate_kwargs: passed to ``instantiate`` (``where``, ``extra_prefixes``).

    Returns:
        The optimizer. Its first group holds the parameters no ``param_groups`` entry matched.
        Adam and AdamW run fused (``fused=True``) unless the section sets ``fused`` or
        ``foreach``.
    """
    where = instantiate_kwargs.setdefault("where", "optimizer")
    options = {k: v for k, v in node.items() if k != PARAM_GROUPS_KEY}
    groups = param_groups(model, node.get(PARAM_GROUPS_KEY), where)
    # torch keeps unknown keys of a group silently: check them against the optimizer's options.
    target = resolve_target(
        options.get("_target_"), where, instantiate_kwargs.get("extra_prefixes", ())
    )
    for i, spec in enumerate(node.get(PARAM_GROUPS_KEY) or []):
        extra = {k: v for k, v in spec.items() if k != "match"}
        check_arguments(target, extra, f"{where}.{PARAM_GROUPS_KEY}[{i}]")
    if target in _FUSED_BY_DEFAULT and not {"fused", "foreach"} & set(options):
        params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        if params and all(_fusable(p) for p in params):
            options["fused"] = True
    return instantiate(options, groups, **instantiate_kwargs)


def _fusable(param: torch.Tensor) -> bool:
    return param.device.type in _FUSED_DEVICES and param.dtype in _FUSED_DTYPES
