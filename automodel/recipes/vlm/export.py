"""Merging a saved LoRA adapter into its base model: ``automodel export merge-lora``."""

from __future__ import annotations

from pathlib import Path

from automodel.errors import UsageError
from automodel.models.auto import AutoModelForImageTextToText, load_processor
from automodel.training.checkpoint import save_hf_folder


def merge_lora(
    base: str, adapter: str | Path, out: str | Path, trust_remote_code: bool = False
) -> Path:
    """Loads ``base``, applies the PEFT adapter in ``adapter``, merges, and saves to ``out``.

    The processor (with its chat template) comes from the adapter folder when it holds one,
    otherwise from the base. ``trust_remote_code`` lets the base folder run its own code.

    Returns:
        ``out``, an ordinary Hugging Face folder.
    """
    import peft

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"--adapter {adapter}: no adapter_config.json there (not a PEFT adapter folder)"
        )
    # In the base's own dtype: a bfloat16 base merges and saves as bfloat16, with no float32
    # copy of the whole model (twice the memory, and a merged model twice the size on disk).
    model = AutoModelForImageTextToText.from_pretrained(
        base, torch_dtype="auto", trust_remote_code=trust_remote_code
    )
    model = peft.PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    has_processor = any(
        (adapter / f).is_file() for f in ("processor_config.json", "tokenizer.json")
    )
    processor = load_processor(
        str(adapter) if has_processor else base, trust_remote_code=trust_remote_code
    )
    return save_hf_folder(merged, processor, out)
