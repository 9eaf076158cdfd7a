"""The dataset every builder returns: records in, conversation samples out, images decoded late.

A ``ConversationDataset`` holds a ``RecordSource`` (raw records, nothing decoded) and an index
array (the split, the hold-out side, the ``limit``). A subclass turns one raw record into a
conversation whose image parts still hold references (a path, ``{"bytes", "path"}``, or an
image); ``__getitem__`` decodes those in the DataLoader worker that asked for the sample.

``check(i)`` is the cheap per-sample test the pre-training scan runs (``automodel.datasets.
checks``): the record parses, it has a non-empty reply, and each image exists and its header
opens, without decoding pixels. ``location(i)`` names the sample as ``file:line`` or a row.
"""

from __future__ import annotations

import base64
import io
import operator
import os
from typing import Any

import datasets
import numpy as np
import torch.utils.data
from PIL import ExifTags, Image, ImageOps

from automodel.datasets.vlm.sources import (
    BadSampleError,
    RecordSource,
    holdout_indices,
    one_line,
)
from automodel.errors import UsageError

ROLES = ("system", "user", "assistant")

# An image reference before decoding: an absolute path, a datasets-style {"bytes", "path"}
# dict, or an already decoded image (a dataset the user built in Python).
ImageRef = Any


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset of conversation samples; images are decoded in ``__getitem__``.

    Subclasses implement ``to_conversation(record)``.
    """

    # The metric group automodel.eval scores this data with unless eval.metrics says otherwise.
    default_metric: str | None = None

    what = "dataset"

    def __init__(
        self,
        source: RecordSource,
        indices: np.ndarray | None = None,
        image_size: int | None = None,
    ) -> None:
        self.source = source
        self.indices = np.arange(len(source), dtype=np.int64) if indices is None else indices
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.indices)

    def record_index(self, idx: Any) -> int:
        """The source record behind sample ``idx`` (negative indices count from the end)."""
        i = operator.index(idx)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {idx} out of range for {n} samples in {self.source.name}")
        return int(self.indices[i])

    def location(self, idx: int) -> str:
        """Where sample ``idx`` comes from: ``file.jsonl:17``, ``file.json[3]`` or a row."""
        return self.source.location(self.record_index(idx))

    def to_conversation(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """One raw record as a conversation with image references (no decoding)."""
        raise NotImplementedError

    def conversation(self, idx: int) -> list[dict[str, Any]]:
        """Sample ``idx`` as a checked conversation whose images are still references.

        Raises:
            BadSampleError: the record cannot be parsed or has no usable reply.
        """
        record = self.source.read(self.record_index(idx))
        conversation = self.to_conversation(record)
        check_conversation(conversation)
        return conversation

    def __getitem__(self, idx: int) -> dict[str, list[dict[str, Any]]]:
        conversation = self.conversation(idx)
        return {"conversation": decode_images(conversation, self.image_size)}

    def check(self, idx: int, seen: dict[str, str | None] | None = None) -> str | None:
        """The reason sample ``idx`` is unusable, or ``None``; images are opened, not decoded.

        Args:
            idx: sample index.
            seen: cache of image path -> reason, shared across calls so an image referenced by
                many records is opened once.
        """
        try:
            conversation = self.conversation(idx)
        except (BadSampleError, UsageError) as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - an odd record is a bad sample, not a crash
            return f"the record does not fit the format ({one_line(exc)})"
        for ref in image_refs(conversation):
            reason = check_image(ref, seen)
            if reason:
                return reason
        return None

    # ----------------------------------------------------------------- helpers for subclasses
    def image_ref(self, value: Any) -> ImageRef:
        """A record's image value as a reference: relative paths resolve against the data file's
        folder; ``data:`` URLs become bytes; remote URLs are refused (nothing is downloaded)."""
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and ("bytes" in value or "path" in value):
            if value.get("bytes"):
                return {"bytes": value["bytes"], "path": value.get("path")}
            value = value.get("path")
        if not isinstance(value, str) or not value:
            raise BadSampleError(f"no image (got {_short(value)})")
        if value.startswith("data:"):
            try:
                payload = "".join(value.split(",", 1)[1].split())  # wrapped lines too
                data = base64.b64decode(payload, validate=True)
            except (IndexError, ValueError) as exc:
                raise BadSampleError(f"unreadable data: URL image ({one_line(exc)})") from None
            if not data:
                raise BadSampleError("empty data: URL image")
            return {"bytes": data, "path": None}
        if value.startswith(("http://", "https://")):
            raise BadSampleError(
                f"remote image {value!r}: images are read from disk; download them first"
            )
        path = os.path.expanduser(value)
        if not os.path.isabs(path) and self.source.base_dir:
            path = os.path.join(self.source.base_dir, path)
        return path


def check_conversation(conversation: list[dict[str, Any]]) -> None:
    """Raises ``BadSampleError`` unless the conversation has a reply to learn from, after a
    user turn (a reply without a prompt has nothing to answer)."""
    replies, users = 0, 0
    for number, turn in enumerate(conversation, start=1):
        if turn["role"] not in ROLES:
            raise BadSampleError(f"turn {number} has an unknown role {turn['role']!r}")
        users += turn["role"] == "user"
        if turn["role"] != "assistant":
            continue
        if not users:
            raise BadSampleError(f"the reply in turn {number} comes before any user turn")
        text = "".join(p.get("text", "") for p in turn["content"] if p["type"] == "text")
        if not text.strip():
            raise BadSampleError(f"the reply in turn {number} is empty")
        replies += 1
    if not replies:
        raise BadSampleError("no reply: the sample has no assistant turn")


def image_refs(conversation: list[dict[str, Any]]) -> list[ImageRef]:
    """Every image reference of a conversation, in order."""
    return [p["image"] for turn in conversation for p in turn["content"] if p["type"] == "image"]


def decode_images(
    conversation: list[dict[str, Any]], image_size: int | None
) -> list[dict[str, Any]]:
    """The conversation with each image reference replaced by a decoded RGB image."""
    return [
        {
            **{k: v for k, v in turn.items() if k != "content"},
            "content": [
                {"type": "image", "image": load_image(p["image"], image_size)}
                if p["type"] == "image"
                else p
                for p in turn["content"]
            ],
        }
        for turn in conversation
    ]


def load_image(ref: ImageRef, image_size: int | None = None) -> Image.Image:
    """Decode one image reference as RGB, fitted within ``image_size`` (aspect kept) when set.

    Files are read as ``datasets.Image`` reads embedded images (EXIF orientation applied), so an
    image gives the same pixels whether a JSONL names its path or a parquet holds its bytes. The
    first frame of an animation is used; ``to_rgb`` handles transparency and 16-bit images.

    Raises:
        BadSampleError: the file is missing or does not decode.
    """
    try:
        if isinstance(ref, Image.Image):
            image = to_rgb(ref)
        elif isinstance(ref, dict):
            if not ref.get("bytes") and not ref.get("path"):
                raise BadSampleError("the image is empty (no bytes and no path)")
            # Through datasets' own decoder, as datasets.Image columns decode.
            image = to_rgb(datasets.Image().decode_example(ref))
        else:
            with Image.open(ref) as opened:
                image = to_rgb(_upright(opened))
                if image is opened:
                    image = image.copy()  # closing the file frees the pixels it holds
    except FileNotFoundError:
        raise BadSampleError(f"image not found: {_ref_name(ref)}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSampleError(f"image {_ref_name(ref)} does not decode ({one_line(exc)})") from None
    if image_size is not None:
        width, height = image.size
        scale = image_size / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, as datasets' ``Image.decode_example`` does
    (datasets/features/image.py)."""
    if image.getexif().get(ExifTags.Base.Orientation) is not None:
        return ImageOps.exif_transpose(image)
    return image


# 16-bit greyscale modes: Pillow's convert("RGB") clips them at 255 (a 16-bit PNG turns white).
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB.

    Transparency (RGBA, LA, a palette's transparent index) is composited onto white, as
    transformers' ``convert_to_rgb`` does before a processor sees an image; 16-bit greyscale is
    scaled to 8 bits instead of clipped. CMYK, palette, bilevel and greyscale images are
    converted by Pillow.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT:
        pixels = np.asarray(image, dtype=np.uint32)  # [H, W]
        image = Image.fromarray((pixels // 257).astype(np.uint8))  # mode L
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # transformers' convert_to_rgb (transformers/image_transforms.py, v5.24.0), in PIL.
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def check_image(ref: ImageRef, seen: dict[str, str | None] | None = None) -> str | None:
    """Why an image reference is unusable (missing, not an image, broken), or ``None``.

    Opens the header and runs PIL's ``verify()`` (structure and checksums, no pixel decoding).
    """
    if isinstance(ref, Image.Image):
        return None
    key = ref if isinstance(ref, str) else None
    if key is not None and seen is not None and key in seen:
        return seen[key]
    reason = None
    try:
        if isinstance(ref, dict):
            stream = io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref.get("path")
        else:
            stream = ref
        if stream is None:
            reason = "the image is empty (no bytes and no path)"
        elif isinstance(stream, str) and not os.path.isfile(stream):
            reason = f"image not found: {stream}"
        else:
            with Image.open(stream) as image:
                image.verify()
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises, it is one bad sample
        reason = f"image {_ref_name(ref)} is not a readable image ({one_line(exc)})"
    if key is not None and seen is not None:
        seen[key] = reason
    return reason


def set_image_root(source: RecordSource, image_root: str | os.PathLike[str] | None) -> None:
    """Resolve relative image paths against ``image_root`` instead of the data file's folder.

    Raises:
        UsageError: ``image_root`` is not a folder (every image would be missing).
    """
    if image_root is not None:
        folder = os.path.abspath(os.path.expanduser(os.fspath(image_root)))
        if not os.path.isdir(folder):
            raise UsageError(
                f"image_root {os.fspath(image_root)!r} is not a folder; set it to the folder the "
                "records' relative image paths start from"
            )
        source.base_dir = folder


def select_indices(
    source: RecordSource,
    split: str,
    val_fraction: float | None,
    seed: int,
    limit: int | None,
    what: str,
) -> np.ndarray:
    """The record indices of one builder call: the hold-out side (if any), then ``limit``."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UsageError(f"{what} limit={limit!r} must be a positive integer or null.")
    if val_fraction is None:
        indices = np.arange(len(source), dtype=np.int64)
    else:
        indices = holdout_indices(len(source), split, val_fraction, seed, what)
    return indices[:limit] if limit is not None else indices


def check_image_size(image_size: int | None, what: str) -> None:
    """Raises ``UsageError`` unless ``image_size`` is a positive integer or ``None``."""
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise UsageError(f"{what} image_size={image_size!r} must be a positive integer or null.")


def text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def image_part(ref: ImageRef) -> dict[str, Any]:
    return {"type": "image", "image": ref}


def _ref_name(ref: ImageRef) -> str:
    if isinstance(ref, dict):
        return ref.get("path") or f"<{len(ref.get('bytes') or b'')} embedded bytes>"
    return str(ref)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
