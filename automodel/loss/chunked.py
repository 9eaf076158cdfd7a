"""Linear + cross-entropy over the labelled positions without full-vocabulary logits for all of them.

``label_loss`` is the one call the training loop makes: it runs the decoder, keeps the hidden
states where a next-token label exists, and hands them to the loss. A plain loss
(``MaskedCrossEntropy``) gets ``[N, V]`` logits; a loss with ``takes_hidden = True``
(``ChunkedCrossEntropy``, ``LigerFusedLinearCrossEntropy``) gets the ``[N, D]`` hidden states and
the output projection instead, and never holds the logits of more than ``chunk_size`` positions.

``ChunkedCrossEntropy`` computes the gradient of each chunk while its logits are at hand (as
Liger's fused kernel does), so the backward pass keeps only ``d hidden`` ``[N, D]`` and
``d weight`` ``[V, D]``, the size of the weight's own gradient.
"""

from __future__ import annotations

import torch

from automodel.common import IGNORE_INDEX, unwrap


def label_hidden(model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states where a next-token label exists, and those labels.

    Args:
        model: a transformers ``*ForConditionalGeneration`` VLM or a PEFT model wrapping one.
        batch: the model inputs (``input_ids``, ``attention_mask``, ``pixel_values`` ...).
        labels: ``[B, T]`` ids aligned with ``input_ids``, ``-100`` where no loss is taken.

    Returns:
        ``hidden`` ``[N, D]`` and ``targets`` ``[N]`` for the N labelled positions.
    """
    model = unwrap(model)
    hidden = model.model(**batch, use_cache=False).last_hidden_state  # [B, T, D]
    targets = labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE_INDEX
    return hidden[:, :-1][keep], targets[keep]


def final_softcap(model) -> float | None:
    """Gemma's ``final_logit_softcapping`` (logits -> tanh(logits / c) * c), if the model has one."""
    return getattr(unwrap(model).config.get_text_config(), "final_logit_softcapping", None)


def label_loss(
    model, batch: dict, labels: torch.Tensor, loss_fn, num_label_tokens=None
) -> torch.Tensor:
    """The training loss of one micro-batch, with full-vocabulary logits only where labelled.

    Args:
        model: the VLM (or its PEFT wrapper).
        batch: the model inputs, labels removed.
        labels: ``[B, T]`` labels aligned with ``input_ids``.
        loss_fn: ``MaskedCrossEntropy``-like (takes logits), or one with ``takes_hidden = True``
            (takes hidden states and the output projection's weight).
        num_label_tokens: the divisor (the step's label-token count).

    Returns:
        A scalar loss.
    """
    hidden, targets = label_hidden(model, batch, labels)
    if getattr(loss_fn, "takes_hidden", False):
        head = unwrap(model).get_output_embeddings()
        return loss_fn(hidden, head.weight, targets, num_label_tokens, softcap=final_softcap(model))
    return loss_fn(output_logits(model, hidden), targets, num_label_tokens)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` logits of ``[N, D]`` hidden states: the output projection, then the softcap."""
    logits = unwrap(model).get_output_embeddings()(hidden)
    softcap = final_softcap(model)
    if softcap:
        logits = torch.tanh(logits.float() / softcap) * softcap
    return logits


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T`` (softcapped), gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, ignore_index):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # [C, D]
            t = targets[start : start + chunk_size]  # [C]
            valid = t != ignore_index
            t = torch.where(valid, t, 0)
            logits = (h.to(weight.dtype) @ weight.T).float()  # [C, V]
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            picked = logits.gather(1, t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(lse - picked)/d logits = softmax - one_hot; reuse the logits' memory for it.
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), t] -= 1
            grad *= valid[:, None]
            if softcap:
                grad *= 1 - capped * capped
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad.T.float(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: these buffers are not used again, and a copy of d weight ([V, D]) would
        # cost as much memory as the weight itself.
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


# Logits per chunk when chunk_size is not given: 2**24 fp32 values = 64 MB.
CHUNK_ELEMENTS = 2**24


class ChunkedCrossEntropy:
    """Output projection + cross-entropy, ``chunk_size`` positions at a time.

    Equal to ``MaskedCrossEntropy`` on the projected (and softcapped) logits, but the largest
    logits tensor is ``[chunk_size, V]`` in the forward and in the backward pass. Logits and
    the softmax are computed in fp32 whatever the hidden states' dtype.

    Args:
        chunk_size: positions per chunk; memory ~ ``chunk_size x V x 4`` bytes. By default
            chosen so that a chunk's fp32 logits take about 64 MB (64 positions at Gemma 3's
            262k vocabulary, 8192 at 2k).
        ignore_index: targets with this value contribute nothing.
    """

    takes_hidden = True

    def __init__(self, chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX):
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be at least 1")
        self.chunk_size = chunk_size
        self.ignore_index = ignore_index

    def __call__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        num_label_tokens: torch.Tensor | int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden: ``[N, D]`` hidden states (already at the labelled positions).
            weight: ``[V, D]`` output projection.
            targets: ``[N]`` target ids.
            num_label_tokens: the divisor; defaults to this call's label-token count.
            softcap: Gemma's final logit softcapping, or ``None``.

        Returns:
            A scalar loss.
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
        chunk = self.chunk_size or max(1, CHUNK_ELEMENTS // weight.shape[0])
        total = _ChunkedLinearCrossEntropy.apply(
            hidden, weight, targets, softcap, chunk, self.ignore_index
        )
        if num_label_tokens is None:
            num_label_tokens = (targets != self.ignore_index).sum()
        return total / num_label_tokens


class LigerFusedLinearCrossEntropy:
    """Liger's fused Triton linear + cross-entropy (CUDA only; ``pip install liger-kernel``).

    Args:
        ignore_index: targets with this value contribute nothing.
    """

    takes_hidden = True

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        if not torch.cuda.is_available():
            raise RuntimeError(
                "LigerFusedLinearCrossEntropy needs CUDA; use automodel.loss.ChunkedCrossEntropy"
            )
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional

        self.make = LigerFusedLinearCrossEntropyLoss
        self.ignore_index = ignore_index
        self.by_softcap: dict = {}

    def __call__(self, hidden, weight, targets, num_label_tokens=None, softcap=None):
        if softcap not in self.by_softcap:
            self.by_softcap[softcap] = self.make(
                ignore_index=self.ignore_index, reduction="sum", softcap=softcap
            )
        targets = targets.reshape(-1)
        total = self.by_softcap[softcap](weight, hidden.reshape(-1, hidden.shape[-1]), targets)
        if num_label_tokens is None:
            num_label_tokens = (targets != self.ignore_index).sum()
        return total / num_label_tokens
