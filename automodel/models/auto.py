"""Loading models and processors: the transformers classes themselves, with clear errors.

There is no parallel model hierarchy: ``AutoModelForImageTextToText.from_pretrained`` returns
the transformers model. Freezing, LoRA and sharding are applied afterwards by the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from automodel.common import parse_dtype
from automodel.errors import UsageError
from automodel.paths import is_local_path


def _check_source(name: str, what: str, key: str) -> None:
    if is_local_path(name) and not Path(name).expanduser().is_dir():
        raise UsageError(
            f"{what} folder not found: {name} (set {key} to a Hugging Face folder or a hub id)"
        )


class AutoModelForImageTextToText:
    """``transformers.AutoModelForImageTextToText`` with config-friendly arguments."""

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str,
        torch_dtype: Any = None,
        dtype: Any = None,
        attn_implementation: str | dict | None = None,
        trust_remote_code: bool = False,
        use_liger_kernel: bool = False,
        revision: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        config_overrides: dict | None = None,
    ) -> transformers.PreTrainedModel:
        """Loads a VLM from a local Hugging Face folder or a hub id.

        Args:
            pretrained_model_name_or_path: folder or hub id.
            torch_dtype / dtype: parameter dtype (``bfloat16``, ``float32`` ...); default float32.
            attn_implementation: ``sdpa``, ``eager`` ...; or one per part of the model, e.g.
                ``{text_config: eager, vision_config: sdpa}``; default lets transformers pick.
            trust_remote_code: passed through to transformers.
            use_liger_kernel: accepted for NeMo AutoModel configs; Liger kernels are not applied.
            revision, cache_dir, local_files_only: as in transformers' ``from_pretrained``.
            config_overrides: attributes set on the model config before the weights load.

        The argument list is closed on purpose: a misspelt key is an error, not an attribute
        silently added to the model config.

        Raises:
            UsageError: the folder does not exist, or the model cannot be loaded.
        """
        name = str(pretrained_model_name_or_path)
        _check_source(name, "model", "model.pretrained_model_name_or_path")
        dtype = parse_dtype(dtype if dtype is not None else torch_dtype, "model.torch_dtype", True)
        dtype = dtype or torch.float32
        kwargs: dict[str, Any] = {"revision": revision, "cache_dir": cache_dir}
        kwargs["local_files_only"] = local_files_only
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        kwargs.update(config_overrides or {})
        try:
            return transformers.AutoModelForImageTextToText.from_pretrained(
                name, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"cannot load model {name!r}: {first} "
                "(offline? set model.pretrained_model_name_or_path to a local folder)"
            ) from None


def load_for_inference(pretrained_model_name_or_path: str, dtype: Any = "auto"):
    """A saved model ready to generate: in the dtype it was saved in (``auto``) unless told
    otherwise, on the GPU when there is one.

    A bfloat16 checkpoint then takes its own size in memory, not twice that as float32.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(
        pretrained_model_name_or_path, torch_dtype=dtype
    )
    return model.to(device)


def load_processor(pretrained_model_name_or_path: str, **kwargs: Any):
    """Loads the processor (tokenizer, image processor, chat template) of a model.

    Raises:
        UsageError: the folder does not exist or holds no processor.
    """
    name = str(pretrained_model_name_or_path)
    _check_source(name, "processor", "processor.pretrained_model_name_or_path")
    try:
        return transformers.AutoProcessor.from_pretrained(name, **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load the processor of {name!r}: {first}") from None
