"""Synthetic CORD-v2 receipts and the CORD-v2 conversation dataset, fully offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from automodel.datasets.vlm import make_cord_v2_dataset
from automodel.datasets.vlm.cord_v2 import DEFAULT_PROMPT, gt_parse_to_donut
from automodel.demo.receipts import CATALOGUE, make_receipts
from automodel.errors import UsageError

N = 24
SPLIT_SIZES = {"train": N, "validation": 8, "test": 8}
CORD_KEYS = {"gt_parse", "meta", "valid_line", "roi", "repeating_symbol", "dontcare"}


@pytest.fixture(scope="module", autouse=True)
def _private_datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    # Keep load_dataset's Arrow cache out of the user's home directory.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        yield


@pytest.fixture(scope="module")
def receipts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_receipts(tmp_path_factory.mktemp("receipts"), n=N, seed=0)


def _parquet(root: Path, split: str) -> Path:
    return root / "data" / f"{split}-00000-of-00001.parquet"


def _rows(root: Path, split: str) -> list[dict]:
    return pq.read_table(_parquet(root, split)).to_pylist()


def test_layout_matches_cord_v2(receipts_dir: Path) -> None:
    assert (receipts_dir / "README.md").read_text().strip()
    for split, size in SPLIT_SIZES.items():
        table = pq.read_table(_parquet(receipts_dir, split))
        assert table.column_names == ["image", "ground_truth"]
        assert table.num_rows == size
        features = datasets.Features.from_arrow_schema(table.schema)
        assert isinstance(features["image"], datasets.Image)
        assert features["ground_truth"] == datasets.Value("string")
        row = table.slice(0, 1).to_pylist()[0]
        # PNG bytes are embedded, not referenced by path.
        assert row["image"]["path"] is None
        assert row["image"]["bytes"].startswith(b"\x89PNG\r\n\x1a\n")
        truth = json.loads(row["ground_truth"])
        assert set(truth) == CORD_KEYS
        assert truth["meta"]["split"] == split
        assert truth["repeating_symbol"] == [] and truth["dontcare"] == []


def test_same_seed_is_byte_identical_and_other_seed_differs(
    receipts_dir: Path, tmp_path: Path
) -> None:
    again = make_receipts(tmp_path / "again", n=N, seed=0)
    other = make_receipts(tmp_path / "other", n=N, seed=1)
    for split in SPLIT_SIZES:
        assert _parquet(again, split).read_bytes() == _parquet(receipts_dir, split).read_bytes()
        ours, theirs = _rows(receipts_dir, split), _rows(other, split)
        assert [r["ground_truth"] for r in ours] != [r["ground_truth"] for r in theirs]
        assert [r["image"]["bytes"] for r in ours] != [r["image"]["bytes"] for r in theirs]


def test_held_out_splits_are_unseen_combinations(receipts_dir: Path) -> None:
    def menus(split: str) -> set[str]:
        return {
            json.dumps(json.loads(r["ground_truth"])["gt_parse"]["menu"])
            for r in _rows(receipts_dir, split)
        }

    train, validation, test = menus("train"), menus("validation"), menus("test")
    assert not train & validation
    assert not (train | validation) & test


def test_splits_load_offline(receipts_dir: Path) -> None:
    for split, size in SPLIT_SIZES.items():
        assert datasets.load_dataset(str(receipts_dir), split=split).num_rows == size
        assert len(make_cord_v2_dataset(receipts_dir, split=split)) == size
    assert len(make_cord_v2_dataset(str(receipts_dir), split="train", limit=5)) == 5
    assert len(make_cord_v2_dataset(str(receipts_dir), split="train[:3]")) == 3


def test_sample_schema(receipts_dir: Path) -> None:
    ds = make_cord_v2_dataset(str(receipts_dir), split="validation")
    sample = ds[0]
    assert list(sample) == ["conversation"]
    user, assistant = sample["conversation"]
    assert list(user) == ["role", "content"] and user["role"] == "user"
    assert [part["type"] for part in user["content"]] == ["image", "text"]
    assert list(user["content"][0]) == ["type", "image"]
    image = user["content"][0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert user["content"][1] == {"type": "text", "text": DEFAULT_PROMPT}
    assert assistant["role"] == "assistant"
    assert assistant["content"] == [{"type": "text", "text": ds.target(0)}]
    assert ds.target(-1) == ds.target(len(ds) - 1)
    with pytest.raises(IndexError):
        ds[len(ds)]
    custom = make_cord_v2_dataset(str(receipts_dir), split="validation", prompt="Parse it.")
    assert custom[0]["conversation"][0]["content"][1]["text"] == "Parse it."


def test_targets_match_ground_truth(receipts_dir: Path) -> None:
    rows = _rows(receipts_dir, "train")
    as_json = make_cord_v2_dataset(str(receipts_dir), split="train")
    as_donut = make_cord_v2_dataset(str(receipts_dir), split="train", target_format="donut")
    for i, row in enumerate(rows):
        gt_parse = json.loads(row["ground_truth"])["gt_parse"]
        assert json.loads(as_json.target(i)) == gt_parse
        assert list(json.loads(as_json.target(i))) == ["menu", "total"]  # stored key order
        donut = as_donut.target(i)
        assert donut.startswith("<s_menu><s_nm>") and donut.endswith("</s_total>")
        assert donut.count("<sep/>") == len(gt_parse["menu"]) - 1
        # Prices follow from the catalogue and the counts; the total is their sum.
        total = 0
        for item in gt_parse["menu"]:
            assert f"<s_nm>{item['nm']}</s_nm>" in donut
            price = int(item["price"].replace(",", ""))
            assert price == CATALOGUE[item["nm"]] * int(item["cnt"])
            total += price
        assert int(gt_parse["total"]["total_price"].replace(",", "")) == total
        assert gt_parse["total"]["total_price"] == f"{total:,}"


def test_donut_tokens_follow_json2token() -> None:
    parse = {"menu": [{"nm": "Tea", "cnt": "1"}, {"nm": "Cake", "cnt": "2"}], "total": {"x": 3}}
    assert gt_parse_to_donut(parse) == (
        "<s_menu><s_nm>Tea</s_nm><s_cnt>1</s_cnt><sep/><s_nm>Cake</s_nm><s_cnt>2</s_cnt></s_menu>"
        "<s_total><s_x>3</s_x></s_total>"
    )
    assert gt_parse_to_donut({"text_sequence": "plain"}) == "plain"


def test_image_size_fits_and_keeps_aspect(receipts_dir: Path) -> None:
    ds = make_cord_v2_dataset(str(receipts_dir), split="test", image_size=96)
    assert ds[0]["conversation"][0]["content"][0]["image"].size == (96, 96)
    wide = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (200, 100), 255)], "ground_truth": ['{"gt_parse": {}}']},
        features=datasets.Features(
            {"image": datasets.Image(), "ground_truth": datasets.Value("string")}
        ),
    )
    image = make_cord_v2_dataset(wide, image_size=50)[0]["conversation"][0]["content"][0]["image"]
    assert image.size == (50, 25) and image.mode == "RGB"


def test_images_decode_lazily(receipts_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = []
    original = datasets.Image.decode_example

    def counting(self, value, token_per_repo_id=None):
        decoded.append(1)
        return original(self, value, token_per_repo_id=token_per_repo_id)

    monkeypatch.setattr(datasets.Image, "decode_example", counting)
    start = time.perf_counter()
    ds = make_cord_v2_dataset(str(receipts_dir), split="train", target_format="donut")
    assert time.perf_counter() - start < 5
    assert decoded == []
    ds.target(3)
    assert decoded == []
    assert isinstance(ds[3]["conversation"][0]["content"][0]["image"], Image.Image)
    assert len(decoded) == 1


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dir"
    with pytest.raises(UsageError, match="does not exist") as err:
        make_cord_v2_dataset(str(missing))
    assert str(missing) in str(err.value) and "make_receipts" in str(err.value)


def test_unknown_split_lists_available(receipts_dir: Path) -> None:
    with pytest.raises(UsageError, match="'dev' not found") as err:
        make_cord_v2_dataset(str(receipts_dir), split="dev")
    assert "train, validation, test" in str(err.value)


def test_missing_column_lists_columns(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    table = pa.table({"image": [b"x"], "text": ["hello"]})
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(UsageError, match="'ground_truth' column") as err:
        make_cord_v2_dataset(str(tmp_path), split="train")
    assert "columns: image, text" in str(err.value)


def test_bad_arguments(receipts_dir: Path) -> None:
    with pytest.raises(UsageError, match="target_format 'xml' is unknown.*json, donut"):
        make_cord_v2_dataset(str(receipts_dir), target_format="xml")
    with pytest.raises(UsageError, match="image_size"):
        make_cord_v2_dataset(str(receipts_dir), image_size=0)
    with pytest.raises(UsageError, match="limit"):
        make_cord_v2_dataset(str(receipts_dir), limit=-1)


def test_hub_failure_suggests_local_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'naver-clova-ix/cord-v2' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match="Could not load dataset 'naver-clova-ix/cord-v2'") as err:
        make_cord_v2_dataset()
    assert "local path" in str(err.value) and "\n" not in str(err.value)


def test_receipt_knobs_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not fit"):
        make_receipts(tmp_path, n=2, font_size=60)
    with pytest.raises(UsageError, match="max_items"):
        make_receipts(tmp_path, n=2, max_items=0)
    small = make_receipts(tmp_path / "small", n=3, val_n=2, test_n=1, max_items=1, max_qty=1)
    assert [len(_rows(small, s)) for s in ("train", "validation", "test")] == [3, 2, 1]
    assert all(
        len(json.loads(r["ground_truth"])["gt_parse"]["menu"]) == 1 for r in _rows(small, "train")
    )


def test_two_folders_with_the_same_name_load_their_own_rows(tmp_path):
    """load_dataset(folder) caches by folder name; two 'receipts' folders must not collide."""
    small = make_receipts(tmp_path / "a" / "receipts", n=8, val_n=8, test_n=8)
    large = make_receipts(tmp_path / "b" / "receipts", n=12, val_n=8, test_n=8)
    assert len(make_cord_v2_dataset(str(small), split="train")) == 8
    assert len(make_cord_v2_dataset(str(large), split="train")) == 12


def test_reuse_keeps_a_build_until_the_code_changes(tmp_path: Path, monkeypatch) -> None:
    from automodel import artifacts

    out = make_receipts(tmp_path / "r", n=8, val_n=8, test_n=8, reuse=True)
    parquet = out / "data" / "train-00000-of-00001.parquet"
    built = parquet.stat().st_mtime_ns
    make_receipts(out, n=8, val_n=8, test_n=8, reuse=True)
    assert parquet.stat().st_mtime_ns == built  # same arguments, same code: reused

    monkeypatch.setattr(artifacts, "code_version", lambda name: "changed")
    time.sleep(0.01)
    make_receipts(out, n=8, val_n=8, test_n=8, reuse=True)
    assert parquet.stat().st_mtime_ns != built  # older code's folder: rebuilt
