"""Masked cross-entropy, summed over label tokens and divided by a count the caller gives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.common import IGNORE_INDEX


class MaskedCrossEntropy:
    """Cross-entropy over the positions whose label is not ``ignore_index``.

    The loss is a *sum* divided by ``num_label_tokens``: the training loop passes the number of
    label tokens in the whole optimizer step (all micro-batches, all ranks), so gradient
    accumulation and data parallelism give the same update as one big batch. Without it the
    result is the mean over this call's label tokens, which matches Hugging Face models' own loss.

    Logits are upcast to fp32 here, per call, so a caller that projects only the label positions
    never holds full-vocabulary fp32 logits for the whole batch.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, fp32_upcast: bool = True):
        self.ignore_index = ignore_index
        self.fp32_upcast = fp32_upcast

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        num_label_tokens: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """
        Args:
            logits: ``[..., V]`` scores, already aligned with ``labels`` (no shift here).
            labels: ``[...]`` target ids, ``ignore_index`` where no loss is taken.
            num_label_tokens: the divisor; defaults to this call's label-token count.

        Returns:
            A scalar loss.
        """
        logits = logits.reshape(-1, logits.shape[-1])
        labels = labels.reshape(-1)
        if self.fp32_upcast:
            logits = logits.float()
        total = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        if num_label_tokens is None:
            num_label_tokens = (labels != self.ignore_index).sum()
        return total / num_label_tokens
