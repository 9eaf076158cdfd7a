"""Loading models and processors: the transformers classes themselves, with clear errors.

There is no parallel model hierarchy: ``AutoModelForImageTextToText.from_pretrained`` returns
the transformers model. Freezing, LoRA and sharding are applied afterwards by the recipe.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import transformers

from automodel.common import parse_dtype
from automodel.config.loader import closest
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
            trust_remote_code: run the folder's own Python code (its config's ``auto_map``);
                off unless the config turns it on.
            use_liger_kernel: accepted for NeMo AutoModel configs; Liger kernels are not applied.
            revision, cache_dir, local_files_only: as in transformers' ``from_pretrained``.
            config_overrides: attributes of the model config (existing ones) set before the
                weights load.

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
        try:
            config = transformers.AutoConfig.from_pretrained(
                name, trust_remote_code=trust_remote_code, **kwargs
            )
            # On the config object, never as from_pretrained keywords: there a key such as
            # weights_only or use_safetensors would change how the weights are read.
            for key, value in (config_overrides or {}).items():
                if not hasattr(config, key):
                    raise UsageError(
                        f"model.config_overrides.{key}: the {config.model_type} config has no "
                        f"attribute {key!r}{closest(key, list(config.to_dict()))}"
                    )
                setattr(config, key, value)
            if attn_implementation is not None:
                kwargs["attn_implementation"] = attn_implementation
            return transformers.AutoModelForImageTextToText.from_pretrained(
                name, config=config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            raise _load_error(name, "model", e) from None


def load_for_inference(
    pretrained_model_name_or_path: str, dtype: Any = "auto", trust_remote_code: bool = False
):
    """A saved model ready to generate: in the dtype it was saved in (``auto``) unless told
    otherwise, on the GPU when there is one.

    A bfloat16 checkpoint then takes its own size in memory, not twice that as float32.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(
        pretrained_model_name_or_path, torch_dtype=dtype, trust_remote_code=trust_remote_code
    )
    return model.to(device)


def load_processor(
    pretrained_model_name_or_path: str, trust_remote_code: bool = False, **kwargs: Any
):
    """Loads the processor (tokenizer, image processor, chat template) of a model.

    Args:
        pretrained_model_name_or_path: folder or hub id.
        trust_remote_code: run the folder's own processor code (``auto_map``); the model
            section's value, False unless the config turns it on.
        **kwargs: passed to ``AutoProcessor.from_pretrained``.

    Raises:
        UsageError: the folder does not exist or holds no processor.
    """
    name = str(pretrained_model_name_or_path)
    _check_source(name, "processor", "processor.pretrained_model_name_or_path")
    try:
        return transformers.AutoProcessor.from_pretrained(
            name, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        raise _load_error(name, "the processor of", e) from None


def _load_error(name: str, what: str, error: Exception) -> UsageError:
    """A loading failure from transformers as one line saying what to do."""
    text = str(error)
    if "trust_remote_code" in text:
        return UsageError(
            f"{name} holds its own Python code (auto_map in its config), which automodel runs "
            "only when told to: set model.trust_remote_code: true (--trust-remote-code for "
            "generate and export), and only for a folder you trust"
        )
    if isinstance(error, pickle.UnpicklingError):
        found = [line for line in text.splitlines() if "GLOBAL" in line] or text.splitlines()
        return UsageError(
            f"cannot load {what} {name!r}: its .bin weights hold objects other than tensors "
            f"({(found or [type(error).__name__])[0].strip()}); they are read with "
            "weights_only=True: use a safetensors copy from a source you trust"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    hint = " (offline? set model.pretrained_model_name_or_path to a local folder)"
    return UsageError(f"cannot load {what} {name!r}: {first}{hint if what == 'model' else ''}")
