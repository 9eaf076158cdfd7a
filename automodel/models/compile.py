"""``torch.compile`` of the language model's decoder blocks (config section ``compile``).

Each block is compiled in place (``module.compile()``), so parameter names, checkpoints and
LoRA are unchanged. Blocks rather than the whole model: Gemma 3's image merge has a data-dependent
``.item()`` that breaks the graph, and one compiled block is reused by every layer.
"""

from __future__ import annotations

import torch

from automodel.common import unwrap
from automodel.config.sections import CompileConfig
from automodel.models.freeze import language_modules


def decoder_layers(model) -> list[torch.nn.Module]:
    """The language model's decoder blocks (the ``layers`` ModuleList inside it)."""
    for module in language_modules(unwrap(model)):
        for name, child in module.named_modules():
            if name.split(".")[-1] == "layers" and isinstance(child, torch.nn.ModuleList):
                return list(child)
    return []


def compile_model(model, config: CompileConfig) -> int:
    """Compiles each decoder block of ``model`` in place when ``config.enabled``.

    Args:
        model: the VLM (or its PEFT wrapper).
        config: the ``compile`` section: ``enabled``, and ``mode``, ``dynamic``,
            ``fullgraph``, ``backend`` passed to ``torch.compile`` (``dynamic=True`` avoids a
            recompile for every new sequence length).

    Returns:
        The number of blocks compiled.
    """
    if not config.enabled:
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(
            mode=config.mode,
            dynamic=config.dynamic,
            fullgraph=config.fullgraph,
            backend=config.backend,
        )
    return len(layers)
