"""Running a VLM for training without full-vocabulary logits for every position."""

from __future__ import annotations

import torch

from automodel.loss.masked_ce import IGNORE_INDEX
from automodel.peft.lora import unwrap


def to_model(batch: dict, model) -> dict:
    """The batch's tensors on the model's device, floating ones (pixels) in its dtype.

    Non-tensor entries (sample names, counts) are left out: they are not model inputs.
    """
    param = next(model.parameters())
    return {
        k: (v.to(param.device, param.dtype) if torch.is_floating_point(v) else v.to(param.device))
        for k, v in batch.items()
        if torch.is_tensor(v)
    }


def label_logits(model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that carry a label, and their targets.

    The decoder's hidden states are gathered where a next-token label exists before the output
    projection, so with Gemma 3's 262k vocabulary only the learned-from tokens ever get
    full-vocabulary logits. The labels follow the Hugging Face convention (aligned with
    ``input_ids``; the shift happens here).

    Args:
        model: a transformers ``*ForConditionalGeneration`` VLM (``model.model`` is its base),
            or a PEFT model wrapping one (its LoRA layers live inside the wrapped model).
        batch: the model inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...).
        labels: ``[B, T]`` target ids, ``-100`` where no loss is taken.

    Returns:
        ``logits`` ``[N, V]`` and ``targets`` ``[N]`` for the N labelled positions.
    """
    model = unwrap(model)
    hidden = model.model(**batch, use_cache=False).last_hidden_state  # [B, T, D]
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N, V]
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits.float() / softcap) * softcap
    return logits, targets[keep]
