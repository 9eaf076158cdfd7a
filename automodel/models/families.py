"""The family registry: everything automodel knows about a model family, in one place.

One ``Family`` per transformers ``model_type``. Freezing, LoRA, FSDP2's tower wrap, the vision
cache, packing, the collate's image tokens, the length estimate and the alignment loss read it
(``family_of(model)``, ``family_of_processor(processor)``); no other module names a family or
one of its attributes. A model whose ``model_type`` is not registered still runs: its parts are
found by the attribute names transformers gives them (``probed_family``), with a one-line notice.
``docs/families.md`` says how to add a family.

Module paths are attribute paths from the ``*ForConditionalGeneration`` model, as in
``model.get_submodule(path)`` and in ``named_modules()`` names.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn


@dataclass(frozen=True)
class Family:
    """What automodel needs to know about one model family.

    Attributes:
        model_type: the transformers ``config.model_type``.
        tower: module paths of the vision tower. A projector nested inside it (Qwen2-VL's patch
            merger) is not part of the tower when freezing.
        projector: module paths of the vision-to-language projector.
        decoder: module paths of the language model (``lm_head`` comes from
            ``get_output_embeddings()``).
        embeddings: module path of the input token embeddings (None: ``get_input_embeddings()``).
        lora_targets: globs over full module names: the linear layers LoRA adapts by default.
        lora_exclude: globs never adapted by ``match_all_linear`` (tower, projector, head).
        cached_tower: the module whose ``forward`` the vision cache wraps; None when the tower
            cannot be cached (it does not embed each image of a ``[N, C, H, W]`` batch alone).
        rope_index: the base model's method giving multimodal position ids (packing), or None
            for positions ``first_position, first_position + 1, ...``.
        rope_index_inputs: the batch keys that method takes.
        first_position: the first position id of a sequence.
        bidirectional: spans attended both ways, from ``token_type_ids``: ``"image"`` (each
            image's block of tokens) or ``"prefix"`` (a prefix-LM's prompt); None: causal.
        one_mask_only: the forward takes one 4D mask, not one mask per layer type.
        image_token_attrs: processor and tokenizer attributes holding ids of image tokens
            (placeholders and the markers around them): never labelled, never truncated.
        config_image_token: the config attribute holding the placeholder's id.
        tokens_per_image_attrs: processor (then image processor) attributes holding the fixed
            number of tokens an image becomes (empty: dynamic, counted as 0 when estimating).
        stop_tokens: the tokens that end an assistant reply.
        template_fixup: a fix the family's hub chat template needs (a reply that does not end
            with a stop token), applied to the processor's template when the run starts, so
            labels and the template ``final_model`` ships both carry it (None: the template is
            used as it is).
        packing_refusal: given the model's config, why packed rows cannot give this model's
            padded results (a one-line reason; packing then refuses to start), or None.
    """

    model_type: str
    tower: tuple[str, ...]
    projector: tuple[str, ...]
    decoder: tuple[str, ...]
    embeddings: str | None
    lora_targets: tuple[str, ...]
    lora_exclude: tuple[str, ...]
    cached_tower: str | None
    image_token_attrs: tuple[str, ...]
    config_image_token: str | None
    tokens_per_image_attrs: tuple[str, ...] = ()
    stop_tokens: tuple[str, ...] = ()
    rope_index: str | None = None
    rope_index_inputs: tuple[str, ...] = ()
    first_position: int = 0
    bidirectional: Literal["image", "prefix"] | None = None
    one_mask_only: bool = False
    template_fixup: TemplateFixup | None = None
    packing_refusal: Callable[[Any], str | None] | None = None
    registered: bool = True


@dataclass(frozen=True)
class TemplateFixup:
    """A textual fix to a hub chat template: ``old`` becomes ``new`` wherever it occurs.

    A template that lacks ``old`` (another revision, or one the user wrote) is left alone.
    """

    note: str
    old: str
    new: str

    def __call__(self, template: str) -> str:
        return template.replace(self.old, self.new)


# llava-hf/llava-1.5-*-hf's template ends each reply with a space and no </s>, so a model
# fine-tuned on it never learns to stop. LLaVA 1.5 itself was trained with "</s>" closing each
# reply (its "v1" conversation format); the fix restores that.
_LLAVA_EOS = TemplateFixup(
    note="its hub chat template ends replies without </s>; each reply now ends with </s>, "
    "labelled, and final_model's template carries the fix",
    old="{% generation %}{{ content['text'] + ' '}}{% endgeneration %}",
    new="{% generation %}{{ content['text'] + eos_token }}{% endgeneration %}",
)


def _family(
    model_type: str, tower: str, projector: str, decoder: str, cacheable: bool = True, **facts
) -> Family:
    """An entry whose LoRA globs and embeddings follow from its module paths."""
    return Family(
        model_type=model_type,
        tower=(tower,),
        projector=(projector,),
        decoder=(decoder,),
        embeddings=f"{decoder}.embed_tokens",
        lora_targets=(f"{decoder}.*",),
        lora_exclude=(f"{tower}.*", f"{projector}.*", "lm_head"),
        cached_tower=tower if cacheable else None,
        **facts,
    )


# Gemma 3's processor names <start_of_image> its image token; its tokenizer's image token is
# the soft token the features replace. Both count.
_GEMMA3 = _family(
    "gemma3",
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.language_model",
    image_token_attrs=("image_token_id", "boi_token_id", "eoi_token_id"),
    config_image_token="image_token_id",
    tokens_per_image_attrs=("image_seq_length",),
    stop_tokens=("<end_of_turn>",),
    bidirectional="image",
)
_PALIGEMMA = _family(
    "paligemma",
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.language_model",
    image_token_attrs=("image_token_id", "image_token_index"),
    config_image_token="image_token_id",
    tokens_per_image_attrs=("image_seq_length",),
    stop_tokens=("<eos>",),
    first_position=1,
    bidirectional="prefix",
    one_mask_only=True,
)


# Gemma 4: the tower takes patches with their 2D positions and returns the soft tokens of all the
# batch's images in one sequence (not cacheable image by image); embed_vision projects them.
# <|image|> is the soft token, <|image> and <image|> frame each image. An image becomes at most
# image_seq_length soft tokens (the processor's budget; fewer when the aspect ratio does not
# fill it). E2B and E4B attend causally over images (use_bidirectional_attention=None).
def _gemma4_packing_refusal(config) -> str | None:
    # 26B-A4B and 31B set use_bidirectional_attention="vision": image tokens attend both ways
    # within their image (from mm_token_type_ids) on sliding-window layers only ("all": every
    # token, every layer). Packed masks build neither.
    mode = getattr(config.get_text_config(), "use_bidirectional_attention", None)
    if mode is None:
        return None
    return (
        f"this Gemma 4 checkpoint sets use_bidirectional_attention={mode!r} (as 26B-A4B and 31B "
        "do), which packed masks do not build"
    )


_GEMMA4 = _family(
    "gemma4",
    "model.vision_tower",
    "model.embed_vision",
    "model.language_model",
    cacheable=False,
    image_token_attrs=("image_token_id", "boi_token_id", "eoi_token_id"),
    config_image_token="image_token_id",
    tokens_per_image_attrs=("image_seq_length",),
    stop_tokens=("<turn|>",),
    packing_refusal=_gemma4_packing_refusal,
)


def _qwen_vl(
    model_type: str, rope_inputs: tuple[str, ...], deepstack: bool = False, **facts
) -> Family:
    # The patch merger (the projector) lives inside the vision module; position ids are the
    # model's own multimodal RoPE rows. Qwen3-VL's DeepStack mergers, beside it, project
    # intermediate tower layers into the first decoder layers: projectors too.
    family = _family(
        model_type,
        "model.visual",
        "model.visual.merger",
        "model.language_model",
        cacheable=False,
        image_token_attrs=("image_token_id", "vision_start_token_id", "vision_end_token_id"),
        config_image_token="image_token_id",
        stop_tokens=("<|im_end|>",),
        rope_index="get_rope_index",
        rope_index_inputs=rope_inputs,
        **facts,
    )
    if deepstack:
        projector = (*family.projector, "model.visual.deepstack_merger_list")
        family = dataclasses.replace(family, projector=projector)
    return family


_QWEN_ROPE_INPUTS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw")


def _idefics3_like(model_type: str) -> Family:
    # Images are split into tiles plus a global view, each framed by <fake_token_around_image>.
    return _family(
        model_type,
        "model.vision_model",
        "model.connector",
        "model.text_model",
        image_token_attrs=("image_token_id", "fake_image_token_id", "global_image_token_id"),
        config_image_token="image_token_id",
        tokens_per_image_attrs=("image_seq_len",),
        stop_tokens=("<end_of_utterance>",),
    )


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _GEMMA3,
        _GEMMA4,
        _PALIGEMMA,
        _qwen_vl("qwen2_vl", (*_QWEN_ROPE_INPUTS, "attention_mask")),
        _qwen_vl("qwen2_5_vl", (*_QWEN_ROPE_INPUTS, "second_per_grid_ts", "attention_mask")),
        _qwen_vl("qwen3_vl", (*_QWEN_ROPE_INPUTS, "attention_mask"), deepstack=True),
        # Qwen3.5 through its image path: the tower and processor of Qwen3-VL without DeepStack,
        # a decoder of Gated DeltaNet layers (three in four) and full-attention layers.
        _qwen_vl(
            "qwen3_5",
            (*_QWEN_ROPE_INPUTS, "attention_mask"),
            packing_refusal=lambda config: (
                "qwen3_5's Gated DeltaNet layers (a causal convolution and a recurrent state) "
                "run through a packed row without stopping at sample boundaries"
            ),
        ),
        _idefics3_like("smolvlm"),
        _idefics3_like("idefics3"),
        # InternVL 3: each image is cropped into tiles (plus a thumbnail), each tile becomes
        # image_seq_length <IMG_CONTEXT> tokens, the whole image framed by <img> ... </img>.
        _family(
            "internvl",
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model",
            image_token_attrs=("image_token_id", "start_image_token_id", "end_image_token_id"),
            config_image_token="image_token_id",
            tokens_per_image_attrs=("image_seq_length",),
            stop_tokens=("<|im_end|>",),
        ),
        # LFM2-VL: a SigLIP2 NaFlex tower (patch sequences, masks and spatial shapes, so not
        # cached); its decoder's short convolutions reach across sample boundaries (no packing).
        # An image is framed by <|image_start|> ... <|image_end|> (tile and thumbnail markers in
        # between).
        _family(
            "lfm2_vl",
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model",
            cacheable=False,
            image_token_attrs=("image_token_id", "image_start_token_id", "image_end_token_id"),
            config_image_token="image_token_id",
            stop_tokens=("<|im_end|>",),
            packing_refusal=lambda config: (
                "lfm2_vl's decoder mixes neighbouring tokens outside attention (short "
                "convolutions), so packed samples would see each other"
            ),
        ),
        # Mistral 3: a Pixtral tower reads all images of a batch as one sequence (at their own
        # sizes) and its hidden states are read by layer, so it is not cached. Each row of [IMG]
        # ends with [IMG_BREAK], the image with [IMG_END].
        _family(
            "mistral3",
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model",
            cacheable=False,
            image_token_attrs=("image_token_id", "image_break_token_id", "image_end_token_id"),
            config_image_token="image_token_id",
            stop_tokens=("</s>",),
        ),
        # LLaVA 1.5 (CLIP tower, second-to-last layer) and LLaVA with a SigLIP tower.
        _family(
            "llava",
            "model.vision_tower",
            "model.multi_modal_projector",
            "model.language_model",
            image_token_attrs=("image_token_id", "image_token_index"),
            config_image_token="image_token_id",
            stop_tokens=("</s>",),
            template_fixup=_LLAVA_EOS,
        ),
    )
}

# ---------------------------------------------------------------------------- the fallback
# Attribute names under ``model.model`` that transformers 5.x gives each part.
_TOWER_NAMES = ("vision_tower", "vision_model", "visual")
_PROJECTOR_NAMES = (
    "multi_modal_projector",
    "connector",
    "mm_projector",
    "merger",
    "deepstack_merger_list",
    "embed_vision",
)
_DECODER_NAMES = ("language_model", "text_model")
_IMAGE_TOKEN_ATTRS = (
    "image_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "fake_image_token_id",
    "global_image_token_id",
    "start_image_token_id",
    "end_image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "image_break_token_id",
)
_CONFIG_IMAGE_TOKEN_ATTRS = ("image_token_id", "image_token_index")
_TOKENS_PER_IMAGE_ATTRS = ("image_seq_length", "num_image_tokens", "image_seq_len")
_ROPE_INDEX = "get_rope_index"
# Every attribute name the fallback looks for (the registry test keeps them out of other modules).
PROBED_NAMES = frozenset(
    _TOWER_NAMES
    + _PROJECTOR_NAMES
    + _DECODER_NAMES
    + _IMAGE_TOKEN_ATTRS
    + _CONFIG_IMAGE_TOKEN_ATTRS
    + _TOKENS_PER_IMAGE_ATTRS
    + (_ROPE_INDEX,)
)

_PROBING = Family(
    model_type="",
    tower=(),
    projector=(),
    decoder=(),
    embeddings=None,
    lora_targets=tuple(g for name in _DECODER_NAMES for g in (f"{name}.*", f"*.{name}.*")),
    lora_exclude=(
        "*vision_tower*",
        "*vision_model*",
        "*visual*",
        "*multi_modal_projector*",
        "*connector*",
        "*embed_vision*",
        "*lm_head*",
    ),
    cached_tower=None,
    image_token_attrs=_IMAGE_TOKEN_ATTRS,
    config_image_token=None,
    tokens_per_image_attrs=_TOKENS_PER_IMAGE_ATTRS,
    registered=False,
)

_NOTICED: set[str] = set()


def _notice(what: str) -> None:
    if what in _NOTICED:
        return
    _NOTICED.add(what)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"{what} is not in automodel's family registry; finding its parts by attribute "
            "names (see docs/families.md)",
            file=sys.stderr,
            flush=True,
        )


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (a PEFT, DDP or ``TrainForward`` wrapper, or the
    model itself); ``model`` itself when it holds none."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)


def family_of(model: nn.Module) -> Family:
    """The registry's entry for ``model`` (or a wrapper around it), else one found by probing.

    Returns:
        The ``Family`` of ``config.model_type``; for an unregistered family, ``probed_family``
        (after a one-line notice, once per ``model_type``).
    """
    inner = transformers_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    _notice(f"model_type {model_type!r}" if model_type else type(inner).__name__)
    return probed_family(inner)


def _child_names(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if isinstance(getattr(module, n, None), nn.Module)]


def probed_family(model: nn.Module) -> Family:
    """A ``Family`` for an unregistered model, its parts found by attribute names.

    Parts are looked for on ``model.model`` (the transformers base model), a projector also
    inside the tower; the vision cache takes the one tower part whose ``embeddings`` (or
    ``vision_model.embeddings``) cut images with a convolution; the image token id is the
    config's ``image_token_id`` (or ``image_token_index``); position ids come from the base
    model's ``get_rope_index`` when it has one.
    """
    base = getattr(model, "model", model)
    prefix = "model." if base is not model else ""
    towers = [prefix + n for n in _child_names(base, _TOWER_NAMES)]
    projectors = [prefix + n for n in _child_names(base, _PROJECTOR_NAMES)]
    for tower in towers:
        projectors += [
            f"{tower}.{n}" for n in _child_names(model.get_submodule(tower), _PROJECTOR_NAMES)
        ]
    family = dataclasses.replace(
        _PROBING,
        model_type=getattr(getattr(model, "config", None), "model_type", None) or "",
        tower=tuple(towers),
        projector=tuple(projectors),
        decoder=tuple(prefix + n for n in _child_names(base, _DECODER_NAMES)),
    )
    config = getattr(model, "config", None)
    image_token = next(
        (a for a in _CONFIG_IMAGE_TOKEN_ATTRS if isinstance(getattr(config, a, None), int)), None
    )
    rope = _ROPE_INDEX if callable(getattr(base, _ROPE_INDEX, None)) else None
    cached = [path for path, module in tower_parts(model, family) if _embeds_whole_images(module)]
    return dataclasses.replace(
        family,
        config_image_token=image_token,
        rope_index=rope,
        rope_index_inputs=_signature(getattr(base, _ROPE_INDEX)) if rope else (),
        cached_tower=cached[0] if len(cached) == 1 else None,
    )


def _embeds_whole_images(tower: nn.Module) -> bool:
    """True for a tower whose embeddings (``embeddings`` or ``vision_model.embeddings``) cut
    ``[N, C, H, W]`` images into patches with a convolution; not for one fed patch sequences
    (SigLIP2 NaFlex's linear patch embedding), which the vision cache cannot key by image."""
    embeddings = getattr(tower, "embeddings", None) or getattr(
        getattr(tower, "vision_model", None), "embeddings", None
    )
    return isinstance(embeddings, nn.Module) and any(
        isinstance(m, nn.Conv2d) for m in embeddings.modules()
    )


def _signature(method: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(method).parameters)


def tower_parts(model: nn.Module, family: Family) -> list[tuple[str, nn.Module]]:
    """The vision tower's modules, without a projector nested inside it (for Qwen2-VL the
    children of the vision module other than the patch merger), as ``(path, module)``."""
    projector = set(family.projector)
    parts = []
    for path in family.tower:
        children = [f"{path}.{n}" for n, _ in model.get_submodule(path).named_children()]
        if projector.intersection(children):
            parts += [(c, model.get_submodule(c)) for c in children if c not in projector]
        else:
            parts.append((path, model.get_submodule(path)))
    return parts


def family_of_processor(processor) -> Family:
    """The registry's entry for the family whose processor class ``processor`` is (transformers'
    own ``model_type`` -> processor table), else the probing family (with a one-line notice)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = type(processor).__name__
    for model_type, processor_class in PROCESSOR_MAPPING_NAMES.items():
        if processor_class == name and model_type in FAMILIES:
            return FAMILIES[model_type]
    _notice(f"processor {name}")
    return _PROBING


def chat_template(processor) -> str | None:
    """The processor's chat template with its family's fix-up applied (None: it has none)."""
    template = getattr(processor, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        return None
    fixup = family_of_processor(processor).template_fixup
    return fixup(template) if fixup is not None else template


def fix_chat_template(processor) -> str | None:
    """Applies the family's template fix-up to ``processor`` (and its tokenizer) in place.

    Returns:
        A one-line notice when the template changed, else None.
    """
    family = family_of_processor(processor)
    before = getattr(processor, "chat_template", None)
    fixed = chat_template(processor)
    if family.template_fixup is None or not isinstance(before, str) or fixed == before:
        return None
    processor.chat_template = fixed
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None:
        tokenizer.chat_template = fixed
    return f"{family.model_type}: {family.template_fixup.note}"


def image_token_ids(processor) -> list[int]:
    """Ids of the tokens that stand for an image (placeholders and markers), from the
    processor's and its tokenizer's attributes the family names."""
    family = family_of_processor(processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {
        value
        for source in (processor, tokenizer)
        for attr in family.image_token_attrs
        if isinstance(value := getattr(source, attr, None), int)
    }
    return sorted(ids)


def tokens_per_image(processor) -> int:
    """The fixed number of tokens an image becomes, where the processor says (else 0)."""
    family = family_of_processor(processor)
    for owner in (processor, getattr(processor, "image_processor", None)):
        for name in family.tokens_per_image_attrs:
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    return 0


def image_token_id(model: nn.Module) -> int:
    """The id of the image placeholder token, from the model's config.

    Raises:
        ValueError: the config names none.
    """
    inner = transformers_model(model)
    attr = family_of(inner).config_image_token
    value = getattr(inner.config, attr, None) if attr else None
    if isinstance(value, int):
        return value
    raise ValueError(f"{type(inner).__name__}'s config names no image token id")


def rope_index(model: nn.Module) -> tuple[Callable | None, tuple[str, ...]]:
    """The base model's multimodal position-id method and the batch keys it takes (None, ()
    for a family with plain positions)."""
    family = family_of(model)
    if family.rope_index is None:
        return None, ()
    inner = transformers_model(model)
    return getattr(inner.model, family.rope_index), family.rope_index_inputs
