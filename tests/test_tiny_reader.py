"""teach_tower_to_read: trains only the tiny twin's tower and projector, saves a loadable twin."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from automodel.demo.reader import (
    _Targets,
    cell_characters,
    receipt_fields,
    teach_tower_to_read,
)
from automodel.errors import UsageError


def test_receipt_fields_pads_missing_lines_and_accepts_a_single_menu_dict():
    gt = {
        "menu": {"nm": "Tea", "cnt": "3", "price": "27,000"},
        "total": {"total_price": "27,000"},
    }
    assert receipt_fields(gt, 2) == ["Tea", "3", "27,000", "", "", "", "27,000"]
    assert receipt_fields({}, 1) == ["", "", "", ""]


def _word(x0, y0, x1, y1, text):
    quad = {"x1": x0, "y1": y0, "x2": x1, "y2": y0, "x3": x1, "y3": y1, "x4": x0, "y4": y1}
    return {"quad": quad, "text": text}


def test_cell_characters_puts_each_character_in_the_cell_of_its_centre():
    truth = {
        "meta": {"image_size": {"width": 64, "height": 64}},
        "valid_line": [
            {"words": [_word(0, 0, 48, 10, "abc")]},  # centres at x 8, 24, 40
            {"words": [_word(40, 40, 64, 50, "7"), _word(34, 40, 38, 50, "9")]},
        ],
    }
    assert cell_characters(truth, grid=2, per_cell=4) == ["ab", "c", "", "97"]
    assert cell_characters(truth, grid=2, per_cell=1) == ["a", "c", "", "9"]
    assert cell_characters(truth, grid=1, per_cell=8) == ["ab9c7"]


def test_targets_align_numbers_right_and_words_left():
    targets = _Targets([["Tea", "27,000"], ["Latte", "9,000"]])
    assert targets.widths == [5, 6]
    assert targets.right_aligned == [False, True]
    pad = 0
    code = targets.encode(["Tea", "9,000"])
    chars = [targets.charset[c] if c != pad else "_" for c in code]
    assert "".join(chars) == "Tea__" + "_9,000"


def _state(folder):
    return load_file(str(folder / "model.safetensors"))


def test_trains_tower_and_projector_only_and_reuses(tiny_gemma3, receipts, tmp_path, capsys):
    out = tmp_path / "reader"
    teach_tower_to_read(tiny_gemma3, receipts, out, steps=2, batch_size=4, reuse=True)
    assert "exact fields on 8 validation receipts" in capsys.readouterr().out

    before, after = _state(tiny_gemma3), _state(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    assert all("vision" in k or "multi_modal_projector" in k for k in changed), sorted(changed)
    assert any("multi_modal_projector" in k for k in changed)
    assert (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists()

    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(out)  # an ordinary Hugging Face folder

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    teach_tower_to_read(tiny_gemma3, receipts, out, steps=2, batch_size=4, reuse=True)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert "step" not in capsys.readouterr().out


def test_refuses_to_overwrite_the_source_and_bad_sizes(tiny_gemma3, receipts, tmp_path):
    with pytest.raises(UsageError, match="out_dir must differ"):
        teach_tower_to_read(tiny_gemma3, receipts, tiny_gemma3, steps=1)
    with pytest.raises(UsageError, match="steps=0"):
        teach_tower_to_read(tiny_gemma3, receipts, tmp_path / "x", steps=0)
