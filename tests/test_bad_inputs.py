"""The catalogue of bad inputs (docs/reliability.md): configs and data.

Each case ends one of two ways, never with a traceback: a one-line error naming the place and
the fix (exit code 2), or a counted skip naming the sample. Everything here runs in-process.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from automodel.cli import main
from automodel.config.sections import DataCheckConfig
from automodel.datasets.checks import screen_dataset
from automodel.datasets.collate import default_collate_fn, has_rows, image_token_ids
from automodel.datasets.vlm import make_conversation_dataset, make_image_text_dataset
from automodel.datasets.vlm.base import check_image, load_image
from automodel.errors import UsageError
from automodel.models.auto import load_processor
from tests.conftest import ROOT, catalogue_node_ids, catalogue_rows

NEMO_YAML = ROOT / "examples/vlm/gemma3_vl_4b_cord_v2.yaml"
SKIP = DataCheckConfig(on_bad_sample="skip", max_bad_fraction=0.5)


def _one_line_error(capsys, code: int) -> str:
    """The CLI's whole stderr after a failed command: one line, ``error: ...``."""
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------ configs
# id -> (YAML text, or None for the NeMo example as shipped; overrides; expected in the line)
CONFIGS = {
    "yaml-syntax": ("model:\n  _target_: [unclosed\n", [], "cfg.yaml:3: invalid YAML"),
    "duplicate-key": (
        NEMO_YAML.read_text() + "\nextra:\n  lr: 1.0e-5\n  lr: 1.0e-4\n",
        [],
        "the key 'lr' is written twice",
    ),
    "top-level-list": ("- model\n- dataset\n", [], "the top level must be a mapping"),
    "env-unset": (None, ["--checkpoint.checkpoint_dir=${AUTOMODEL_NOT_SET}/x"], "is not set"),
    "env-malformed": (None, ["--checkpoint.checkpoint_dir=${HOME/x"], "malformed ${...}"),
    "unknown-key-typo": (None, ["--step_scheduler.max_step=3"], "did you mean: max_steps"),
    "wrong-type": (None, ["--step_scheduler.max_steps=three"], "expects a number"),
    "out-of-range": (None, ["--step_scheduler.global_batch_size=0"], "must be at least 1"),
    "bad-choice": (None, ["--precision.autocast=bf61"], "is not one of auto, bf16"),
    "target-typo": (None, ["--optimizer._target_=torch.optim.AdamWW"], "did you mean: AdamW"),
    "target-outside-allowlist": (None, ["--optimizer._target_=os.system"], "outside the allowed"),
    "unknown-section-typo": (
        None,
        ["--step_schedular.max_steps=3"],
        "unknown config section 'step_schedular' (did you mean: step_scheduler",
    ),
}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_bad_config_is_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AUTOMODEL_NOT_SET", raising=False)
    text, overrides, expected = CONFIGS[case]
    config = tmp_path / "cfg.yaml"
    config.write_text(NEMO_YAML.read_text() if text is None else text)
    line = _one_line_error(capsys, main(["validate", "-c", str(config), *overrides]))
    assert expected in line, line


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    line = _one_line_error(capsys, main(["validate", "-c", str(tmp_path / "nope.yaml")]))
    assert "config file not found" in line and "nope.yaml" in line


# ------------------------------------------------------------------------------ data files
def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_a_missing_data_path_or_unknown_file_type_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="does not exist; check the path"):
        make_conversation_dataset(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"unknown type; use \.jsonl"):
        make_conversation_dataset(_write(tmp_path / "data.txt", "hello"))


def test_a_missing_image_root_is_one_line(tmp_path):
    data = _write(tmp_path / "train.jsonl", json.dumps({"image": "a.png", "text": "x"}) + "\n")
    with pytest.raises(UsageError, match="image_root '.*nope' is not a folder"):
        make_image_text_dataset(data, image_root=tmp_path / "nope")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_zero_byte_data_file_has_no_samples(suffix, tmp_path):
    dataset = make_image_text_dataset(_write(tmp_path / f"train{suffix}", b""))
    with pytest.raises(UsageError, match="the dataset has no samples; check its path"):
        screen_dataset(dataset, "dataset", tmp_path, SKIP)


def test_a_zero_byte_parquet_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="Could not load .*Parquet file size is 0 bytes"):
        make_image_text_dataset(_write(tmp_path / "train.parquet", b""))


def test_a_json_array_that_is_not_utf8_or_not_json_is_one_line(tmp_path):
    latin1 = '[{"image": "a.png", "text": "café"}]'.encode("latin-1")
    with pytest.raises(UsageError, match=r"is not UTF-8 text \(byte 0xe9 .*save it as UTF-8"):
        make_conversation_dataset(_write(tmp_path / "latin1.json", latin1))
    with pytest.raises(UsageError, match="is not valid JSON .* write one record per line"):
        make_conversation_dataset(_write(tmp_path / "cut.json", '[{"image": "a.png", '))


# ------------------------------------------------------------------------------ bad records
def _png(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG header claiming width x height pixels (no pixel data): over Pillow's limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _caption(image: str, text="a caption") -> str:
    return json.dumps({"image": image, "text": text})


def _chat(*turns, **record) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns], **record})


IMAGE_TEXT, CONVERSATION = make_image_text_dataset, make_conversation_dataset
# id -> (builder, the bad line, the image files it needs, the reason named)
RECORDS = {
    "missing-image": (IMAGE_TEXT, _caption("missing.png"), {}, "image not found"),
    "corrupt-image": (
        IMAGE_TEXT,
        _caption("bad.png"),
        {"bad.png": b"not an image"},
        "is not a readable image",
    ),
    "zero-byte-image": (
        IMAGE_TEXT,
        _caption("empty.png"),
        {"empty.png": b""},
        "cannot identify image file",
    ),
    "truncated-png": (
        IMAGE_TEXT,
        _caption("cut.png"),
        {"cut.png": _png((64, 64))[:400]},
        "is not a readable image",
    ),
    "decompression-bomb": (
        IMAGE_TEXT,
        _caption("bomb.png"),
        {"bomb.png": _bomb_png()},
        "DecompressionBombError",
    ),
    "malformed-json-line": (IMAGE_TEXT, '{"image": "good.png", "text": ', {}, "malformed JSON"),
    "non-utf8-line": (
        IMAGE_TEXT,
        '{"image": "good.png", "text": "café"}'.encode("latin-1"),
        {},
        "the line is not UTF-8 text (byte 0xe9",
    ),
    "json-array-line": (IMAGE_TEXT, "[1, 2]", {}, "the line is a JSON list, not an object"),
    "wrong-column": (
        IMAGE_TEXT,
        json.dumps({"image": "good.png", "caption": "x"}),
        {},
        "no 'text' field (answer_column); the record has: image, caption",
    ),
    "empty-reply": (IMAGE_TEXT, _caption("good.png", "   "), {}, "no reply"),
    "empty-data-url": (IMAGE_TEXT, _caption("data:image/png;base64,"), {}, "empty data: URL"),
    "bad-data-url": (IMAGE_TEXT, _caption("data:image/png;base64,!!"), {}, "unreadable data: URL"),
    "reply-without-user-turn": (
        CONVERSATION,
        _chat(("system", "Be brief."), ("assistant", "Hello.")),
        {},
        "the reply in turn 2 comes before any user turn",
    ),
    "reply-before-user-turn": (
        CONVERSATION,
        _chat(("assistant", "Hi."), ("user", "What is this?"), ("assistant", "A cat.")),
        {},
        "the reply in turn 1 comes before any user turn",
    ),
}


@pytest.mark.parametrize("case", list(RECORDS))
def test_a_bad_record_is_named_by_line_and_skipped(case, tmp_path):
    builder, bad, images, reason = RECORDS[case]
    (tmp_path / "good.png").write_bytes(_png())
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    good = (
        _caption("good.png")
        if builder is IMAGE_TEXT
        else _chat(("user", "Q?"), ("assistant", "A."))
    )
    bad = bad if isinstance(bad, bytes) else bad.encode()
    data = _write(tmp_path / "train.jsonl", good.encode() + b"\n" + bad + b"\n")
    dataset = builder(data)
    # The default policy stops before the first step, naming file:line and the reason.
    with pytest.raises(UsageError) as error:
        screen_dataset(dataset, "dataset", None)
    message = str(error.value)
    assert "train.jsonl:2: " in message and reason in message and "\n" not in message
    # on_bad_sample: skip trains on the rest; the sample is counted and written down.
    screened = screen_dataset(dataset, "dataset", tmp_path / "run", SKIP)
    assert len(screened) == 1 and screened[0]["conversation"]
    logged = [json.loads(x) for x in (tmp_path / "run/bad_samples.dataset.jsonl").open()]
    assert [r["where"][-len("train.jsonl:2") :] for r in logged] == ["train.jsonl:2"]
    assert reason in logged[0]["reason"]


# ------------------------------------------------------------------------------ odd images
def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _exif_rotated(path: Path) -> Path:
    """A 40x20 JPEG, left half red, whose EXIF says: turn 90 degrees clockwise to view."""
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(image, path, exif=exif)


def _animated(path: Path) -> Path:
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    return _save(frames[0], path, save_all=True, append_images=frames[1:], duration=40, loop=0)


def _palette_with_transparency(path: Path) -> Path:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    return _save(image, path, transparency=0)


# id -> (writer of the file, the pixel at (0, 0) after decoding, the decoded size or None)
IMAGES = {
    "cmyk-jpeg": (
        lambda p: _save(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), p),
        (255, 0, 0),
        None,
    ),
    "16-bit-png": (
        lambda p: _save(Image.fromarray(np.full((20, 20), 51400, dtype=np.uint16)), p),
        (200, 200, 200),  # 51400 / 257: scaled, not clipped to white
        None,
    ),
    "animated-gif": (_animated, (255, 0, 0), None),  # the first frame
    "animated-png": (_animated, (255, 0, 0), None),
    "palette-with-transparency": (_palette_with_transparency, (255, 255, 255), None),
    "rgba-transparent": (
        lambda p: _save(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), p),
        (255, 255, 255),
        None,
    ),
    "greyscale-alpha": (lambda p: _save(Image.new("LA", (20, 20), (0, 255)), p), (0, 0, 0), None),
    "bilevel": (lambda p: _save(Image.new("1", (20, 20), 1), p), (255, 255, 255), None),
    "exif-rotated-jpeg": (_exif_rotated, None, (20, 40)),
    "very-large": (
        lambda p: _save(Image.new("RGB", (4000, 3000), "gray"), p),
        (128, 128, 128),
        (64, 48),
    ),
}
SUFFIX = {
    "animated-gif": ".gif",
    "cmyk-jpeg": ".jpg",
    "exif-rotated-jpeg": ".jpg",
    "very-large": ".jpg",
}


@pytest.mark.parametrize("case", list(IMAGES))
def test_an_unusual_image_decodes_as_8_bit_rgb(case, tmp_path):
    write, pixel, size = IMAGES[case]
    path = write(tmp_path / f"image{SUFFIX.get(case, '.png')}")
    assert check_image(str(path)) is None
    image = load_image(str(path), 64 if case == "very-large" else None)
    assert image.mode == "RGB"
    if pixel is not None:
        assert image.getpixel((0, 0)) == pytest.approx(pixel, abs=2)
    if size is not None:
        assert image.size == size
    if case == "exif-rotated-jpeg":  # the red half is now on top
        assert image.getpixel((10, 5))[0] > 200 and image.getpixel((10, 35))[2] > 200


# ------------------------------------------------------------------------------ the collate
def _image(color=(200, 30, 30)):
    return Image.new("RGB", (32, 32), color)


def _sample(name, user_text="What is this?", reply="A cat.", reasoning=None, system=None):
    turns = (
        []
        if system is None
        else [{"role": "system", "content": [{"type": "text", "text": system}]}]
    )
    turns.append(
        {
            "role": "user",
            "content": [{"type": "image", "image": _image()}, {"type": "text", "text": user_text}],
        }
    )
    reply_turn = {"role": "assistant", "content": [{"type": "text", "text": reply}]}
    if reasoning is not None:
        reply_turn["reasoning"] = reasoning
    return {"id": name, "conversation": turns + [reply_turn]}


def _assert_dropped_alone(batch, processor, name: str, reason: str) -> None:
    """The batch kept only the good sample, with its own image tokens; ``name`` was dropped."""
    assert has_rows(batch) and batch["input_ids"].shape[0] == 1
    assert [n for n, _ in batch["dropped"]] == [name] and reason in batch["dropped"][0][1]
    alone = default_collate_fn([_sample("good")], processor)
    image_ids = torch.tensor(image_token_ids(processor))

    def count(b):
        return int(torch.isin(b["input_ids"], image_ids).sum())

    assert count(batch) == count(alone)
    assert not torch.isin(batch["labels"], image_ids).any()


# id -> (family, the sample's keyword arguments)
SPELLED = {
    "gemma3-image-marker-in-prompt": ("gemma3", {"user_text": "What is <start_of_image> here?"}),
    "gemma3-image-marker-in-reply": ("gemma3", {"reply": "It shows <start_of_image>."}),
    "gemma3-image-token-in-system": ("gemma3", {"system": "Read <image_soft_token> first."}),
    "llava-image-placeholder-in-prompt": ("llava", {"user_text": "Is <image> a tag?"}),
    "qwen3_5-image-pad-in-reasoning": ("qwen3_5", {"reasoning": "The <|image_pad|> shows a cat."}),
}


@pytest.fixture(scope="module")
def processors(tiny_gemma3, tiny_family):
    """``processors(family)``: a twin's processor, loaded once (Gemma 3: the shared twin)."""
    loaded: dict[str, object] = {}

    def get(family: str):
        if family not in loaded:
            folder = tiny_gemma3 if family == "gemma3" else tiny_family(family)
            loaded[family] = load_processor(folder)
        return loaded[family]

    return get


@pytest.mark.parametrize("case", list(SPELLED))
def test_a_special_token_typed_in_text_drops_the_sample(case, processors):
    family, kwargs = SPELLED[case]
    processor = processors(family)
    batch = default_collate_fn([_sample("typed", **kwargs), _sample("good")], processor)
    _assert_dropped_alone(batch, processor, "typed", "spells the special token")


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl"])
def test_a_reply_before_any_user_turn_drops_the_sample(family, processors):
    processor = processors(family)
    reply_first = {
        "id": "reply-first",
        "conversation": [{"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}],
    }
    batch = default_collate_fn([reply_first, _sample("good")], processor)
    _assert_dropped_alone(batch, processor, "reply-first", "a reply before any user turn")


def test_a_batch_that_loses_every_sample_still_names_them(processors):
    processor = processors("gemma3")
    batch = default_collate_fn([_sample("typed", reply="<start_of_image>")], processor)
    assert not has_rows(batch)
    assert [name for name, _ in batch["dropped"]] == ["typed"]


def test_the_training_feed_counts_the_samples_of_a_batch_that_lost_them_all():
    from automodel.training.feed import BatchFeed

    class Loader(list):
        sampler = None

    good = {"input_ids": torch.ones(1, 3, dtype=torch.long), "dropped": [("b", "too long")]}
    loader = Loader([{"dropped": [("a", "no reply")]}, good])
    lines: list[str] = []
    feed = BatchFeed(collate=lambda samples: None, world_size=1)
    batch = next(feed.batches(loader, resumed=False, write=lines.append))
    assert batch["input_ids"].shape == (1, 3) and feed.dropped_samples == 2
    assert lines == ["dropped sample a: no reply", "dropped sample b: too long"]


# ------------------------------------------------------------------------------ generation
def test_generate_refuses_a_prompt_spelling_an_image_token(tiny_gemma3, tmp_path, capsys):
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    prompts = _write(
        tmp_path / "prompts.jsonl", json.dumps({"image": "x.png", "prompt": "<start_of_image>?"})
    )
    args = ["generate", "--model", str(tiny_gemma3), "--jsonl", str(prompts)]
    line = _one_line_error(capsys, main([*args, "--out", str(tmp_path / "out.jsonl")]))
    assert "prompt of item 1: turn 0 (user) spells the special token '<start_of_image>'" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_evaluation_skips_and_counts_a_prompt_spelling_an_image_token(tiny_gemma3, processors):
    from transformers import AutoModelForImageTextToText

    from automodel.eval.evaluate import evaluate

    model = AutoModelForImageTextToText.from_pretrained(tiny_gemma3)
    samples = [_sample("typed", user_text="What is <start_of_image>?"), _sample("good")]
    result = evaluate(model, processors("gemma3"), samples, ["exact_match"], max_new_tokens=2)
    assert [r["index"] for r in result.records] == [1]
    assert result.skipped == [{"index": 0, "reason": result.skipped[0]["reason"]}]
    assert "spells the special token '<start_of_image>'" in result.skipped[0]["reason"]
    with pytest.raises(UsageError, match="no evaluation sample can be generated from: all 1"):
        evaluate(model, processors("gemma3"), samples[:1], ["exact_match"], max_new_tokens=2)


def test_an_overlength_sample_under_on_overlength_error_is_one_line(processors):
    with pytest.raises(UsageError) as error:
        default_collate_fn([_sample("long")], processors("gemma3"), 8, on_overlength="error")
    message = str(error.value)
    assert (
        message.startswith("sample long: ") and "raise dataloader.collate_fn.max_length" in message
    )
    assert "\n" not in message


def test_an_error_raised_in_a_loader_worker_still_reaches_the_user_as_one_line():
    from automodel.datasets.checks import ScreenedDataset
    from automodel.errors import error_line

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise OSError("disk gone")

    dataset = ScreenedDataset(Broken(), [0, 1], "dataset")
    loader = torch.utils.data.DataLoader(dataset, num_workers=1, collate_fn=lambda s: s)
    with pytest.raises(UsageError) as error:
        next(iter(loader))
    assert "Original Traceback" in str(error.value)  # how torch re-raises a worker's error
    assert error_line(error.value) == (
        "dataset: 2 samples in a row from index 0 failed to decode (see the messages above); "
        "the data is broken, not noisy"
    )


# ------------------------------------------------------------------------------ the page
class _Collected:
    """A pytest plugin that keeps the node ids a collection found."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def pytest_collection_finish(self, session) -> None:
        self.ids = {item.nodeid for item in session.items}


def test_the_catalogue_names_only_tests_that_exist():
    rows = catalogue_rows()
    assert len(rows) >= 40
    unnamed = [row[0] for row in rows if not re.fullmatch(r"`tests/\S+\.py::.+`", row[-1])]
    assert not unnamed, f"rows of docs/reliability.md without a test node id: {unnamed}"
    named = catalogue_node_ids()
    files = sorted({node.split("::")[0] for node in named})
    collected = _Collected()
    # Slow tests included (-m ""); the modules are already imported, so this takes seconds.
    options = ["--collect-only", "-q", "-m", "", "-p", "no:cacheprovider", "-p", "no:xdist"]
    code = pytest.main([*options, "--rootdir", str(ROOT), *files], plugins=[collected])
    assert code == 0
    missing = sorted(named - collected.ids)
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
