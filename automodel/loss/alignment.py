"""An optional auxiliary loss: contrastive alignment of each image with its answer text.

For every sample of a micro-batch, the image side is the mean of the projector's outputs (the
embeddings the language model receives at the image-placeholder positions) and the text side is
the mean of the answer tokens' input embeddings. A symmetric InfoNCE over the micro-batch pulls
each image towards its own answer and away from the others'. The text side is detached: the loss
trains the projector (and the tower, when it is not frozen) to map images into the language
model's embedding space, and never moves the word embeddings.

With ``weight: 0`` (the default) nothing is hooked and the loss is the language-model loss
unchanged. A micro-batch with fewer than two samples that have an image and a reply has no
negatives: it adds nothing and is not counted in the logged ``vision_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from automodel.common import IGNORE_INDEX


class ImageTextAlignmentLoss:
    """``lm_loss + weight * vision_loss``, with both parts kept for the metrics line.

    The module that runs the model (``automodel.models.forward.TrainForward``) calls
    ``attach`` with the language model and the image placeholder's id.

    Args:
        weight: factor of the alignment loss; 0 turns it off.
        temperature: softmax temperature of the contrastive logits.
    """

    def __init__(self, weight: float = 0.0, temperature: float = 0.07):
        if weight < 0 or temperature <= 0:
            raise ValueError("vision_loss: weight must be >= 0 and temperature > 0")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self._embeds: torch.Tensor | None = None
        self._sums = {"language_loss": 0.0, "vision_loss": 0.0}
        self._weights = {"language_loss": 0.0, "vision_loss": 0.0}

    def attach(self, decoder: nn.Module, placeholder_id: int) -> None:
        """Captures ``decoder``'s input embeddings (image features merged) on every forward.

        Args:
            decoder: the language model; nothing is hooked when ``weight`` is 0.
            placeholder_id: the token id whose positions hold image features.
        """
        if self.weight:
            self.placeholder_id = placeholder_id
            decoder.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and torch.is_grad_enabled():
            self._embeds = embeds

    def alignment(self, embeds: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        """The contrastive loss of one micro-batch, or None without two usable samples.

        Args:
            embeds: ``[B, T, D]`` the language model's input embeddings (image features merged).
            input_ids: ``[B, T]``.
            labels: ``[B, T]``, ``-100`` outside the replies.
        """
        with torch.autocast(embeds.device.type, enabled=False):  # fp32, as the loss outside
            return self._alignment(embeds, input_ids, labels)

    def _alignment(self, embeds: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor):
        is_image = (input_ids == self.placeholder_id).unsqueeze(-1)  # [B, T, 1]
        is_reply = (labels != IGNORE_INDEX).unsqueeze(-1)
        usable = is_image.any(1).squeeze(-1) & is_reply.any(1).squeeze(-1)  # [B]
        if int(usable.sum()) < 2:
            return None
        embeds = embeds.float()
        image = (embeds * is_image).sum(1) / is_image.sum(1).clamp(min=1)  # [B, D]
        text = (embeds.detach() * is_reply).sum(1) / is_reply.sum(1).clamp(min=1)
        image = F.normalize(image[usable], dim=-1)
        text = F.normalize(text[usable], dim=-1)
        logits = image @ text.T / self.temperature  # [N, N]
        target = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def __call__(
        self,
        lm_loss: torch.Tensor,
        batch: dict,
        labels: torch.Tensor,
        num_label_tokens: torch.Tensor | int,
    ) -> torch.Tensor:
        """The micro-batch's training loss.

        Args:
            lm_loss: the language-model loss of the micro-batch (already divided by the step's
                label-token count).
            batch: the model inputs the forward just ran on (``input_ids`` is read).
            labels: the micro-batch's labels.
            num_label_tokens: the step's label-token count (weights this micro-batch's share).

        Returns:
            ``lm_loss`` when the weight is 0 or in evaluation; otherwise ``lm_loss`` plus the
            weighted alignment loss, scaled by this micro-batch's share of the step's tokens.
        """
        embeds, self._embeds = self._embeds, None
        if not self.weight or embeds is None or not torch.is_grad_enabled():
            return lm_loss
        share = (labels[:, 1:] != IGNORE_INDEX).sum() / num_label_tokens
        self._record("language_loss", lm_loss.detach() / share.clamp(min=1e-12), share)
        vision = self.alignment(embeds, batch["input_ids"], labels)
        if vision is None:
            return lm_loss
        self._record("vision_loss", vision.detach(), share)
        return lm_loss + self.weight * share * vision

    def _record(self, name: str, value: torch.Tensor, share: torch.Tensor) -> None:
        # Tensors until metrics(): no host sync per micro-batch.
        self._sums[name] = self._sums[name] + value * share
        self._weights[name] = self._weights[name] + share.detach()

    def metrics(self, reduce=None, device: torch.device | None = None) -> dict[str, float]:
        """Mean ``language_loss`` and ``vision_loss`` since the last call (empty at weight 0).

        Args:
            reduce: sums a tensor over data-parallel ranks in place (every rank must call it),
                so the means are those of all ranks' micro-batches; None: this process's.
            device: where ``reduce`` takes its tensor (the collective's device).
        """
        if not self.weight:
            return {}
        names = list(self._sums)
        sums, weights = self._sums, self._weights
        if reduce is not None:
            parts = [*sums.values(), *weights.values()]
            totals = reduce(torch.stack([torch.as_tensor(v, device=device).float() for v in parts]))
            sums = dict(zip(names, totals[: len(names)]))
            weights = dict(zip(names, totals[len(names) :]))
        out = {
            name: float(sums[name]) / float(weights[name])
            for name in names
            if float(weights[name]) > 0
        }
        self.reset()
        return out

    def reset(self) -> None:
        """Forgets what was recorded (e.g. a probe step that is not a training step)."""
        self._sums = dict.fromkeys(self._sums, 0.0)
        self._weights = dict.fromkeys(self._weights, 0.0)
