"""Running a VLM for training without full-vocabulary logits for every position."""

from __future__ import annotations

import inspect
from typing import get_args

import torch
from torch import nn

from automodel.common import SEQUENCE_KEYS, unwrap
from automodel.config.sections import Autocast, PrecisionConfig
from automodel.errors import UsageError
from automodel.loss.chunked import label_hidden, label_loss, output_logits
from automodel.models.attention import fp32_attention_on_cpu
from automodel.models.families import image_token_id
from automodel.models.freeze import language_modules


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


def cpu_has_fast_matmul(dtype: torch.dtype) -> bool:
    """Whether torch multiplies ``dtype`` (bf16 / fp16) matrices with oneDNN on this CPU.

    oneDNN's bf16 kernels need AVX512 (BW, VL, DQ), AVX-NE-CONVERT or AMX; its fp16 ones
    AVX512-FP16, AVX-NE-CONVERT or AMX-FP16. Without them torch multiplies in a generic fallback
    loop: on an AVX2-only CPU (AMD EPYC, torch 2.14) 10-60x slower than fp32 for a decoder's
    shapes, and a bf16 convolution 7-20x slower. The check is torch's own
    (``mkldnn_bf16_device_check``, which ``aten/src/ATen/native/mkldnn/Matmul.cpp`` consults
    before its bf16 / fp16 kernels; it also gates torch's CPU bf16 tests).
    """
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The dtype of ``precision.autocast`` (``auto``, ``bf16``, ``fp16``, ``none``) on ``device``.

    ``auto`` is bf16 on a CUDA device that supports it and no autocast elsewhere. On a CPU, bf16
    is fast only with AMX units (there, 3-10x fp32's matmul throughput) and changes every
    matmul's numerics, so a CPU run gets it only when the config asks for ``bf16``; on a CPU
    without native bf16 / fp16 matrix products (``cpu_has_fast_matmul``) that is refused, as
    each step would run many times slower than in fp32.

    Raises:
        UsageError: an unknown mode, or bf16 / fp16 on a CPU without native matrix products.
    """
    if mode not in get_args(Autocast):
        raise UsageError(
            f"precision.autocast: {mode!r} is not one of {', '.join(get_args(Autocast))}"
        )
    if mode == "none":
        return None
    if mode == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    if device.type == "cpu" and not cpu_has_fast_matmul(dtype):
        raise UsageError(
            f"precision.autocast={mode}: this CPU has no native {mode} matrix products (torch's "
            "oneDNN kernels need AVX512 or AMX), and torch's fallback runs them 10-60x slower "
            "than fp32; set precision.autocast=none"
        )
    return dtype


def apply_precision(
    model: nn.Module, precision: PrecisionConfig, dtype: torch.dtype | None, device: torch.device
) -> None:
    """The config's ``precision`` section for ``model`` on ``device``, whose autocast dtype is
    ``dtype`` (``autocast_dtype``; None: no autocast): under CPU autocast, attention in fp32
    unless ``precision.fp32_attention_on_cpu`` is false (see ``models/attention.py``)."""
    if dtype is not None and device.type == "cpu":
        fp32_attention_on_cpu(model, precision.fp32_attention_on_cpu)


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
    hidden, targets = label_hidden(model, batch, labels)
    return output_logits(model, hidden), targets


def blank_image_sample() -> dict:
    """A one-turn sample with a small white image: what a rank without images feeds the tower."""
    from PIL import Image

    image = Image.new("RGB", (32, 32), "white")
    user = [{"type": "image", "image": image}, {"type": "text", "text": "."}]
    return {
        "conversation": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": "."}]},
        ]
    }


def vision_inputs(batch: dict) -> dict:
    """The image-side inputs of a collated batch (``pixel_values``, ``image_grid_thw`` ...)."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in SEQUENCE_KEYS}


def image_features_sum(model, inputs: dict) -> torch.Tensor:
    """Runs the model's vision path (tower and projector) on ``inputs``; the sum of its outputs."""
    base = unwrap(model).model
    fn = base.get_image_features
    named = inspect.signature(fn).parameters
    out = fn(**{k: v for k, v in inputs.items() if k in named})
    return sum(t.float().sum() for t in _tensors(out))


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):  # transformers' ModelOutput is a dict
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class TrainForward(nn.Module):
    """The module the training loop calls: ``(batch, labels, divisor) -> loss``.

    It is the root that DDP or FSDP2 wraps, so their hooks run around the whole step (calling
    ``model.model`` directly would bypass them), and every loss term is computed inside it: the
    language-model loss and, when given, the auxiliary ``vision_loss``. Under data parallelism
    every rank must run the vision path in every micro-batch, or a rank whose samples have no
    image skips the tower's collectives (FSDP2 hangs) or leaves its gradients unset (DDP fails):
    given ``blank_image_inputs``, a batch without images runs the tower on a blank image whose
    output enters the loss times zero.

    Args:
        model: the VLM (or a PEFT model wrapping one).
        loss_fn: the loss (see ``automodel.loss.chunked.label_loss``).
        blank_image_inputs: the vision inputs of one blank image, on the model's device; None
            in a single process.
        packer: packs each micro-batch without padding (``automodel.models.packing.Packer``);
            None runs the padded batch.
        vision_loss: ``(loss, batch, labels, divisor) -> loss`` adding an auxiliary term (e.g.
            ``automodel.loss.alignment.ImageTextAlignmentLoss``); None adds nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        blank_image_inputs: dict | None = None,
        packer=None,
        vision_loss=None,
    ):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.blank_image_inputs = blank_image_inputs
        self.packer = packer
        self.vision_loss = vision_loss
        if getattr(vision_loss, "weight", 0) and hasattr(vision_loss, "attach"):
            # The auxiliary loss reads the language model's input embeddings at image positions.
            vision_loss.attach(language_modules(model)[0], image_token_id(model))

    def forward(self, batch: dict, labels: torch.Tensor, divisor) -> torch.Tensor:
        blank = None
        if self.blank_image_inputs is not None and not vision_inputs(batch):
            blank = image_features_sum(self.model, self.blank_image_inputs)  # before the decoder
        inputs, targets = batch, labels
        if self.packer is not None:
            inputs, targets = self.packer(batch, labels)
        loss = label_loss(self.model, inputs, targets, self.loss_fn, divisor)
        if blank is not None:
            loss = loss + 0.0 * blank
        if self.vision_loss is not None:
            loss = self.vision_loss(loss, batch, labels, divisor)
        return loss
