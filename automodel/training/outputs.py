"""What a finished run leaves beside its checkpoints: ``final_model`` (merged under LoRA),
``final_adapter``, ``loss.png``, and a preview of replies on the validation data."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from automodel.common import is_peft_model, print0
from automodel.generation import generate_reply, prompt_messages, reply_text
from automodel.peft import merge
from automodel.training.checkpoint import save_hf_folder
from automodel.training.plot import plot_losses


def save_final(model: nn.Module, processor, out_dir: Path) -> nn.Module:
    """Writes ``out_dir/final_model`` (and ``final_adapter`` for a PEFT model) and
    ``loss.png``; returns the saved model (merged under LoRA). Call it on one rank."""
    if is_peft_model(model):
        adapter = save_hf_folder(model, processor, out_dir / "final_adapter")
        print0(f"saved {adapter}")
        model = merge(model)  # final_model is the merged, ordinary model
    final = save_hf_folder(model, processor, out_dir / "final_model")
    print0(f"saved {final}")
    picture = plot_losses(out_dir)
    if picture is not None:
        print0(f"saved {picture}")
    return model


def preview(
    model: nn.Module,
    processor,
    dataset,
    num_samples: int,
    max_new_tokens: int,
    chat_template_kwargs: dict | None = None,
) -> None:
    """Prints the model's reply for the first ``num_samples`` samples next to the reference
    (prompted with the chat template variables training used)."""
    if not num_samples or dataset is None:
        return
    for i in range(min(num_samples, len(dataset))):
        conversation = dataset[i]["conversation"]
        prediction = generate_reply(
            model, processor, prompt_messages(conversation), max_new_tokens, chat_template_kwargs
        )
        print0(f"validation sample {i}")
        print0(f"  reference:  {reply_text(conversation[-1])}")
        print0(f"  prediction: {prediction}")
