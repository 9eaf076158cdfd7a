"""Every data format users bring, from the example folders to a model batch, plus the CLI."""

from __future__ import annotations

import base64
import io
import json

import datasets
import pytest
import yaml
from PIL import Image

from automodel.common import IGNORE_INDEX
from automodel.config.instantiate import instantiate
from automodel.datasets.collate import default_collate_fn
from automodel.datasets.vlm import (
    make_conversation_dataset,
    make_cord_v2_dataset,
    make_hf_dataset,
    make_image_text_dataset,
    make_vqa_dataset,
)
from automodel.errors import UsageError
from tests.conftest import ROOT, run_cli

EXAMPLES = ROOT / "examples" / "data"
FORMATS = ("image_text", "conversation", "llava", "vqa", "imagefolder")
# Tiny models gain nothing from two threads, and on a busy machine OpenMP's spinning threads
# made a 2-step run 30x slower (measured: 30 s vs 1 s).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    # Keep load_dataset's Arrow cache out of the user's home directory.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        yield


@pytest.fixture(scope="module")
def processor(tiny_gemma3):
    from automodel.models.auto import load_processor

    return load_processor(str(tiny_gemma3))


def _example(fmt: str, section: str, monkeypatch: pytest.MonkeyPatch):
    """The dataset an example YAML builds (paths in it are relative to the repository root)."""
    cfg = yaml.safe_load((EXAMPLES / fmt / "finetune.yaml").read_text())
    monkeypatch.chdir(ROOT)
    return instantiate(cfg[section], where=section)


def _replies(conversation: list[dict]) -> list[str]:
    return [
        "".join(p["text"] for p in turn["content"] if p["type"] == "text")
        for turn in conversation
        if turn["role"] == "assistant"
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_example_folder_reaches_a_batch_with_answer_only_labels(fmt, processor, monkeypatch):
    train = _example(fmt, "dataset", monkeypatch)
    val = _example(fmt, "validation_dataset", monkeypatch)
    assert len(train) > 0 and len(val) > 0
    # Every sample is the conversation schema with decoded RGB images.
    for i in range(len(train)):
        conversation = train[i]["conversation"]
        assert conversation[-1]["role"] == "assistant"
        for turn in conversation:
            for part in turn["content"]:
                assert part["type"] in ("image", "text")
                if part["type"] == "image":
                    assert isinstance(part["image"], Image.Image) and part["image"].mode == "RGB"
    samples = [train[i] for i in range(min(4, len(train)))]
    batch = default_collate_fn(samples, processor, max_length=256)
    assert batch is not None and batch["dropped"] == []
    tokenizer = processor.tokenizer
    for row, sample in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        text = tokenizer.decode(labelled, skip_special_tokens=True)
        for reply in _replies(sample["conversation"]):
            assert reply in text, (fmt, reply, text)


def test_llava_and_sharegpt_placeholders_and_several_images():
    ds = make_conversation_dataset(EXAMPLES / "llava" / "train.json")
    two = ds[len(ds) - 1]["conversation"]
    kinds = [p["type"] if p["type"] == "image" else p["text"] for p in two[0]["content"]]
    assert kinds == ["First:", "image", "Second:", "image", "Which one is green?"]
    assert ds.location(0).endswith("llava/train.json[0]")


def test_openai_parts_multi_turn_and_data_url(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (20, 10), "red").save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    records = [
        {
            "conversation": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "Size?"},
                {"role": "assistant", "content": [{"type": "text", "text": "20 by 10."}]},
            ]
        },
        # ShareGPT with "messages", string content and a separate images list
        {
            "messages": [
                {"role": "user", "content": "<image>Hi"},
                {"role": "model", "content": "Hello"},
            ],
            "images": ["pic.png"],
        },
    ]
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "pic.png")
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    ds = make_conversation_dataset(tmp_path)  # a folder with <split>.jsonl
    first = ds[0]["conversation"]
    assert [t["role"] for t in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[1]["content"][0]["image"].size == (20, 10)
    assert _replies(first) == ["Red.", "20 by 10."]
    second = ds[1]["conversation"]
    assert second[0]["content"][0]["image"].getpixel((0, 0)) == (0, 0, 255)
    assert second[1] == {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}


def test_relative_image_paths_resolve_against_the_data_file(tmp_path, monkeypatch):
    data = tmp_path / "deep" / "folder"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (6, 4), "green").save(data / "img" / "a.png")
    (data / "train.jsonl").write_text(json.dumps({"image": "img/a.png", "text": "green"}) + "\n")
    monkeypatch.chdir(tmp_path)  # not the data file's folder
    ds = make_image_text_dataset("deep/folder/train.jsonl", prompt="Colour?", image_size=12)
    user, assistant = ds[0]["conversation"]
    assert user["content"][0]["image"].size == (12, 8)
    assert user["content"][1] == {"type": "text", "text": "Colour?"}
    assert assistant["content"][0]["text"] == "green"
    # image_root moves the base, e.g. for a hub dataset whose paths point into a local folder.
    (tmp_path / "elsewhere.jsonl").write_text(json.dumps({"image": "a.png", "text": "g"}) + "\n")
    moved = make_image_text_dataset("elsewhere.jsonl", image_root=data / "img")
    assert moved[0]["conversation"][0]["content"][0]["image"].size == (6, 4)
    assert "image not found" in make_image_text_dataset("elsewhere.jsonl").check(0)


def test_seeded_holdout_is_disjoint_deterministic_and_complete(tmp_path):
    lines = [json.dumps({"image": "x.png", "text": f"t{i}"}) for i in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")

    def texts(split, seed=0, fraction=0.2):
        ds = make_image_text_dataset(tmp_path / "d.jsonl", split, val_fraction=fraction, seed=seed)
        return [ds.conversation(i)[-1]["content"][0]["text"] for i in range(len(ds))]

    train, val = texts("train"), texts("validation")
    assert len(val) == 10 and len(train) == 40
    assert not set(train) & set(val) and set(train) | set(val) == {f"t{i}" for i in range(50)}
    assert texts("validation") == val  # deterministic
    assert texts("validation", seed=1) != val
    with pytest.raises(UsageError, match="val_fraction"):
        make_image_text_dataset(tmp_path / "d.jsonl", split="validation")
    with pytest.raises(UsageError, match=r"val_fraction=1\.5"):
        make_image_text_dataset(tmp_path / "d.jsonl", val_fraction=1.5)


def test_hf_sources_parquet_arrow_save_to_disk_and_path_columns(tmp_path, receipts):
    Image.new("RGB", (5, 5), "white").save(tmp_path / "w.png")
    rows = datasets.Dataset.from_dict(
        {"picture": ["w.png", "w.png"], "q": ["What?", "Which?"], "a": ["white", "pale"]}
    )
    rows.to_parquet(str(tmp_path / "qa.parquet"))
    vqa = make_vqa_dataset(
        tmp_path / "qa.parquet", image_column="picture", question_column="q", answer_column="a"
    )
    assert vqa[1]["conversation"][0]["content"][1]["text"] == "Which?"
    assert vqa[1]["conversation"][0]["content"][0]["image"].size == (5, 5)
    with pytest.raises(UsageError, match="no column 'image'.*picture, q, a"):
        make_vqa_dataset(tmp_path / "qa.parquet")

    # CORD-v2 from a save_to_disk copy (a DatasetDict) and from one parquet / arrow file.
    saved = tmp_path / "saved"
    datasets.load_dataset(str(receipts)).save_to_disk(str(saved))
    from_disk = make_cord_v2_dataset(saved, split="validation", target_format="donut")
    from_folder = make_cord_v2_dataset(receipts, split="validation", target_format="donut")
    assert len(from_disk) == len(from_folder) == 8
    assert from_disk.target(3) == from_folder.target(3)
    parquet = receipts / "data" / "test-00000-of-00001.parquet"
    assert make_cord_v2_dataset(parquet).target(0) == make_cord_v2_dataset(
        receipts, split="test"
    ).target(0)
    arrow = next((saved / "train").glob("*.arrow"))
    assert len(make_cord_v2_dataset(arrow)) == 16
    # A hold-out on CORD's train split, and any split name through make_hf_dataset.
    val = make_cord_v2_dataset(receipts, split="validation", val_fraction=0.25, seed=3)
    assert len(val) == 4
    generic = make_hf_dataset(
        receipts, split="validation", answer_column="ground_truth", prompt="Parse."
    )
    assert json.loads(generic[0]["conversation"][1]["content"][0]["text"])["gt_parse"]


def test_cli_trains_llava_with_openai_parts_validation(tiny_gemma3, tmp_path):
    """One short run: LLaVA JSON for training, OpenAI-parts JSONL (multi-turn) for validation."""
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "finetune", "vlm", "-c", EXAMPLES / "llava" / "finetune.yaml", "~prepare",
        f"--model.pretrained_model_name_or_path={tiny_gemma3}",
        "--validation_dataset.path_or_dataset=examples/data/conversation/train.jsonl",
        "--step_scheduler.max_steps=2", "--step_scheduler.val_every_steps=2",
        "--dataloader.num_workers=1", f"--checkpoint.checkpoint_dir={ckpt}",
        cwd=ROOT, env={"HF_DATASETS_CACHE": str(tmp_path / "hf"), **ONE_THREAD},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dataset: scanned 8 samples" in result.stdout
    assert "validation_dataset: scanned 2 samples" in result.stdout
    steps = [json.loads(x)["step"] for x in (ckpt / "training.jsonl").read_text().splitlines()]
    assert steps[-1] == 2
    assert (ckpt / "final_model" / "model.safetensors").is_file()
    assert (ckpt / "bad_samples.dataset.jsonl").read_text() == ""


def test_cli_trains_vqa_with_imagefolder_validation(tiny_gemma3, tmp_path):
    """One short run: VQA split files for training, an imagefolder for validation."""
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "finetune", "vlm", "-c", EXAMPLES / "vqa" / "finetune.yaml", "~prepare",
        f"--model.pretrained_model_name_or_path={tiny_gemma3}",
        "--validation_dataset._target_=automodel.datasets.vlm.make_hf_dataset",
        "--validation_dataset.path_or_dataset=examples/data/imagefolder",
        "--validation_dataset.split=train", "--validation_dataset.answer_column=caption",
        "--step_scheduler.max_steps=2", "--step_scheduler.val_every_steps=2",
        "--dataloader.num_workers=0", f"--checkpoint.checkpoint_dir={ckpt}",
        cwd=ROOT, env={"HF_DATASETS_CACHE": str(tmp_path / "hf"), **ONE_THREAD},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dataset: scanned 15 samples" in result.stdout
    assert "validation_dataset: scanned 9 samples" in result.stdout
    val = [json.loads(x) for x in (ckpt / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [0, 2] and val[-1]["val_tokens"] > 0


def test_every_example_folder_is_small_and_documented():
    docs = (ROOT / "docs" / "datasets.md").read_text()
    for fmt in (*FORMATS, "cord_v2"):
        folder = EXAMPLES / fmt
        assert (folder / "finetune.yaml").is_file()
        assert f"examples/data/{fmt}/finetune.yaml" in docs
        for path in folder.rglob("*"):
            assert path.stat().st_size < 8_000, path
    assert sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file()) < 100_000


def test_example_configs_validate():
    from automodel.config.loader import load_config
    from automodel.recipes.vlm.config import resolve_config

    for fmt in (*FORMATS, "cord_v2"):
        resolved, _ = resolve_config(load_config(EXAMPLES / fmt / "finetune.yaml", []))
        assert resolved["data_check"]["on_bad_sample"] == "error"


def test_image_text_reads_the_seed_jsonl_through_make_hf_dataset_too(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "s.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"image": "s.png", "text": "x"}) + "\n")
    a = make_image_text_dataset(tmp_path / "train.jsonl")[0]["conversation"]
    b = make_hf_dataset(tmp_path / "train.jsonl")[0]["conversation"]
    assert a[1] == b[1] and a[0]["content"][1] == b[0]["content"][1]


def test_decoding_waits_for_getitem(tmp_path, monkeypatch):
    Image.new("RGB", (4, 4)).save(tmp_path / "s.png")
    lines = [json.dumps({"image": "s.png", "text": str(i)}) for i in range(20)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    opened = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or original(*a, **k))
    ds = make_image_text_dataset(tmp_path / "train.jsonl")
    assert len(ds) == 20 and opened == []
    ds[5]
    assert len(opened) == 1


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, "PNG")
    return buf.getvalue()


def test_embedded_image_bytes_in_a_records_dataset():
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(), "path": None}], "text": ["tiny"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    sample = make_hf_dataset(rows)[0]["conversation"]
    assert sample[0]["content"][0]["image"].size == (3, 3)
