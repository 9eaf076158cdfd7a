"""Bad input: found before the first step, stopped on or skipped by policy, never a crash."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import pytest
import torch
import torch.utils.data
import yaml
from PIL import Image

from automodel.config.sections import DataCheckConfig
from automodel.datasets.checks import ScreenedDataset, screen_dataset
from automodel.datasets.collate import default_collate_fn, image_token_ids
from automodel.datasets.data_check import render_sample
from automodel.datasets.vlm import make_conversation_dataset, make_image_text_dataset
from automodel.errors import UsageError
from automodel.recipes.vlm.data_check import check_config
from tests.conftest import ROOT, labelled_spans, run_cli

SKIP = DataCheckConfig(on_bad_sample="skip", max_bad_fraction=0.6)

# line -> expected reason (None: a good sample). Line 9 is blank and is not a record.
EXPECTED = {
    1: None,
    2: "image not found",
    3: "is not a readable image",
    4: "malformed JSON",
    5: "no 'text' field",
    6: "no reply",
    7: None,
    8: "is not a readable image",  # a truncated PNG: its checksums fail verify()
    10: None,
    11: None,  # a truncated JPEG: opens and verifies, fails only when decoded
    12: None,
}
GOOD_LINES = [line for line, why in EXPECTED.items() if why is None]
BAD_LINES = [line for line, why in EXPECTED.items() if why is not None]


def _noise_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.fixture()
def bad_folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), "white").save(images / "good.png")
    (images / "corrupt.png").write_bytes(b"this is not an image")
    png = _noise_bytes("PNG")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = _noise_bytes("JPEG")
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    rows = [
        json.dumps({"image": "images/good.png", "text": "one"}),
        json.dumps({"image": "images/missing.png", "text": "two"}),
        json.dumps({"image": "images/corrupt.png", "text": "three"}),
        '{"image": "images/good.png", "text": ',
        json.dumps({"image": "images/good.png", "caption": "five"}),
        json.dumps({"image": "images/good.png", "text": "  "}),
        json.dumps({"image": "images/good.png", "text": "seven"}),
        json.dumps({"image": "images/truncated.png", "text": "eight"}),
        "",
        json.dumps({"image": "images/good.png", "text": "ten"}),
        json.dumps({"image": "images/truncated.jpg", "text": "eleven"}),
        json.dumps({"image": "images/good.png", "text": "twelve"}),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def _bad_log(out: Path, name: str = "dataset") -> list[dict]:
    text = (out / f"bad_samples.{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_error_policy_stops_with_file_line_and_reason(bad_folder, tmp_path, capsys):
    ds = make_image_text_dataset(bad_folder / "train.jsonl")
    out = tmp_path / "run"
    with pytest.raises(UsageError) as err:
        screen_dataset(ds, "dataset", out, DataCheckConfig(on_bad_sample="error"))
    message = str(err.value)
    assert "\n" not in message
    assert f"{len(BAD_LINES)} of {len(EXPECTED)} samples are unusable" in message
    assert f"{bad_folder / 'train.jsonl'}:2: image not found" in message
    assert "on_bad_sample=skip" in message
    logged = _bad_log(out)
    assert [int(r["where"].rsplit(":", 1)[1]) for r in logged] == BAD_LINES
    for record in logged:
        line = int(record["where"].rsplit(":", 1)[1])
        assert EXPECTED[line] in record["reason"], record
    printed = capsys.readouterr().out
    for line in BAD_LINES:
        assert f"train.jsonl:{line}:" in printed


def test_skip_policy_keeps_only_good_samples_and_records_the_rest(bad_folder, tmp_path):
    ds = make_image_text_dataset(bad_folder / "train.jsonl")
    out = tmp_path / "run"
    screened = screen_dataset(ds, "dataset", out, SKIP)
    assert len(screened) == len(GOOD_LINES)
    assert [screened.location(i).rsplit(":", 1)[1] for i in range(len(screened))] == [
        str(line) for line in GOOD_LINES
    ]
    assert len(_bad_log(out)) == len(BAD_LINES)
    with pytest.raises(UsageError, match=r"more than data_check\.max_bad_fraction=0\.3"):
        screen_dataset(
            ds, "dataset", out, DataCheckConfig(on_bad_sample="skip", max_bad_fraction=0.3)
        )
    with pytest.raises(UsageError, match="on_bad_sample: 'ignore' is not one of error, skip"):
        screen_dataset(ds, "dataset", out, DataCheckConfig(on_bad_sample="ignore"))


def test_decode_failure_mid_run_is_replaced_counted_and_never_a_crash(bad_folder, tmp_path, capfd):
    ds = make_image_text_dataset(bad_folder / "train.jsonl")
    out = tmp_path / "run"
    screened = screen_dataset(ds, "dataset", out, SKIP)
    loader = torch.utils.data.DataLoader(
        screened, batch_size=2, num_workers=1, collate_fn=lambda samples: samples
    )
    texts = [s["conversation"][1]["content"][0]["text"] for batch in loader for s in batch]
    # The truncated JPEG (line 11) is replaced by the next good sample: no hole in any batch.
    assert len(texts) == len(GOOD_LINES)
    assert "eleven" not in texts and texts.count("twelve") == 2
    decode = [r for r in _bad_log(out) if r["stage"] == "decode"]
    assert len(decode) == 1 and decode[0]["where"].endswith("train.jsonl:11")
    assert "truncated" in decode[0]["reason"]
    assert "WARNING: skipped dataset sample" in capfd.readouterr().err


def test_every_sample_failing_to_decode_is_an_error_not_a_hang(tmp_path):
    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise OSError("disk gone")

    with pytest.raises(UsageError, match="failed to decode"):
        ScreenedDataset(Broken(), [0, 1, 2], "dataset")[0]


def test_wrong_column_lists_the_fields_that_exist(bad_folder, tmp_path):
    ds = make_image_text_dataset(bad_folder / "train.jsonl", image_column="img")
    with pytest.raises(
        UsageError, match=r"no 'img' field \(image_column\); the record has: image, text"
    ):
        screen_dataset(ds, "dataset", tmp_path)
    table = datasets.Dataset.from_dict({"image": ["a.png"], "caption": ["x"]})
    with pytest.raises(UsageError, match="no column 'text'.*columns are: image, caption"):
        make_image_text_dataset(table)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
         "reply in turn 2 is empty"),
        ({"conversations": [{"from": "human", "value": "<image><image>"},
                            {"from": "gpt", "value": "x"}], "image": "a.png"},
         "more image placeholders than images"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "role 'alien'"),
        ({"turns": []}, "no 'messages', 'conversation' or 'conversations' field"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url",
          "image_url": {"url": "https://x/a.png"}}]}, {"role": "assistant", "content": "x"}]},
         "download them first"),
    ],
)  # fmt: skip
def test_conversation_records_without_a_usable_reply(tmp_path, record, reason):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    ds = make_conversation_dataset(tmp_path / "train.jsonl")
    assert reason in ds.check(0)
    with pytest.raises(UsageError, match="train.jsonl:1"):
        screen_dataset(ds, "dataset", None)


def test_data_check_report_in_process(tiny_gemma3, tmp_path, monkeypatch, capsys):
    cfg = yaml.safe_load((ROOT / "examples/data/conversation/finetune.yaml").read_text())
    from automodel.recipes.vlm.config import resolve_config

    cfg.pop("prepare")
    cfg["model"]["pretrained_model_name_or_path"] = str(tiny_gemma3)
    cfg["dataloader"]["collate_fn"]["max_length"] = 70
    resolved, _ = resolve_config(cfg)
    monkeypatch.chdir(ROOT)
    assert check_config(resolved, json_path=tmp_path / "r.json") == 0
    text = capsys.readouterr().out
    assert "== dataset: 8 samples, 0 bad" in text and "image tokens: min 18" in text
    report = json.loads((tmp_path / "r.json").read_text())
    entry = report["datasets"]["dataset"]
    assert entry["image_tokens"]["max"] == 36  # the two-image sample: 2 x (16 + begin + end)
    assert 0 < entry["over_max_length"] < entry["measured"] == 8
    assert f"over max_length=70: {entry['over_max_length']} of 8" in text
    assert entry["samples_per_s"] > 0
    assert f"preprocessing: {entry['samples_per_s']:.1f} samples/s in one process" in text
    assert check_config(resolved, max_samples=3, json_path=tmp_path / "r3.json") == 0
    sampled = json.loads((tmp_path / "r3.json").read_text())["datasets"]["dataset"]
    assert sampled["measured"] == 3 and sampled["num_samples"] == 8
    assert "token lengths measured on 3 samples (seeded subset)" in capsys.readouterr().out


def _conversation() -> list[dict]:
    """Two images over two user turns, two replies: two labelled runs between prompts."""
    red, blue = Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (40, 70), "blue")
    return [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red, mostly."}]},
        {"role": "user", "content": [{"type": "image", "image": blue}, {"type": "text", "text": "This one?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": '{"colour": "blue"}'}]},
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["gemma3", "qwen2_5_vl"])
def test_a_rendered_sample_marks_exactly_the_labels(family, tiny_family):
    """``data check --show``'s rendering: the marked spans are the labelled tokens, image runs
    are collapsed, and image + prompt + label tokens make up the row."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_family(family))
    tokenizer = processor.tokenizer
    batch = default_collate_fn([{"conversation": _conversation()}], processor)
    shown = render_sample(batch, 0, processor)
    ids, labels = batch["input_ids"][0], batch["labels"][0]

    marked = re.findall("\u27e6(.*?)\u27e7", shown.text, flags=re.DOTALL)
    assert marked == labelled_spans(labels, tokenizer) and len(marked) == 2, shown.text
    runs, run = [], []
    for token in labels.tolist() + [-100]:
        if token != -100:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    assert shown.label_runs == runs
    n_image = int(torch.isin(ids, torch.tensor(image_token_ids(processor))).sum())
    assert (shown.image_tokens, shown.label_tokens) == (n_image, int((labels != -100).sum()))
    assert shown.image_tokens + shown.prompt_tokens + shown.label_tokens == shown.length
    assert shown.length == ids.shape[0] == int(batch["attention_mask"][0].sum())
    # Without the marks and with each image run written out, the text is the decoded row.
    expanded = re.sub(
        r"(<[^<>]+>)\u00d7(\d+)", lambda m: m[1] * int(m[2]), shown.text.replace("\u27e6", "")
    ).replace("\u27e7", "")
    assert expanded == tokenizer.decode(ids, skip_special_tokens=False)
    assert "\u00d7" in shown.text and len(shown.text) < len(expanded)


def test_data_check_shows_samples_through_the_configured_collate(tiny_gemma3, tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "examples/data/conversation/finetune.yaml").read_text())
    from automodel.recipes.vlm.config import resolve_config

    cfg.pop("prepare")
    cfg["model"]["pretrained_model_name_or_path"] = str(tiny_gemma3)
    cfg["dataset"]["path_or_dataset"] = str(ROOT / cfg["dataset"]["path_or_dataset"])
    cfg["dataloader"]["collate_fn"]["max_length"] = 60  # cuts some samples, drops one
    cfg.pop("validation_dataset")
    resolved, _ = resolve_config(cfg)
    assert check_config(resolved, max_samples=2, json_path=tmp_path / "r.json", show=8) == 0
    text = capsys.readouterr().out
    assert text.index("-- sample 1: ") < text.index("-- sample 8: ") < text.index("data check: ok")
    samples = json.loads((tmp_path / "r.json").read_text())["samples"]
    assert len(samples) == 8
    kept = [s for s in samples if "dropped" not in s]
    assert kept and len(kept) < 8
    for sample in kept:
        counts = (sample["image_tokens"], sample["prompt_tokens"], sample["label_tokens"])
        assert sample["text"] in text and sum(counts) == sample["length"] <= 60
        assert (
            "tokens: {} = {} image + {} prompt + {} label".format(sample["length"], *counts) in text
        )
        assert "<start_of_image><image_soft_token>\u00d716<end_of_image>" in sample["text"]
    dropped = next(s for s in samples if "dropped" in s)
    assert dropped["dropped"].startswith("no reply token left within max_length=60")
    assert f"dropped by the collate: {dropped['dropped']}" in text
    assert check_config(resolved, max_samples=2) == 0
    assert "-- sample" not in capsys.readouterr().out  # without show: no samples


def _cli_overrides(tiny_gemma3: Path, data: Path, ckpt: Path) -> list[str]:
    return [
        "~prepare",
        "~validation_dataset",
        f"--model.pretrained_model_name_or_path={tiny_gemma3}",
        f"--dataset.path_or_dataset={data}",
        "~dataset.val_fraction",
        f"--checkpoint.checkpoint_dir={ckpt}",
    ]


IMAGE_TEXT_YAML = ROOT / "examples/data/image_text/finetune.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # see test_datasets_formats.py


def test_cli_error_policy_stops_before_the_first_step(tiny_gemma3, bad_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "finetune", "vlm", "-c", IMAGE_TEXT_YAML,
        *_cli_overrides(tiny_gemma3, bad_folder / "train.jsonl", ckpt),
        env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: dataset: 6 of 11 samples are unusable")
    assert "train.jsonl:2: image not found" in error
    assert "step 1" not in result.stdout and not (ckpt / "training.jsonl").exists()
    assert len(_bad_log(ckpt)) == len(BAD_LINES)


def test_cli_skip_policy_trains_and_saves_the_count(tiny_gemma3, bad_folder, tmp_path):
    ckpt = tmp_path / "ckpt"
    result = run_cli(
        "finetune", "vlm", "-c", IMAGE_TEXT_YAML,
        *_cli_overrides(tiny_gemma3, bad_folder / "train.jsonl", ckpt),
        "--data_check.on_bad_sample=skip", "--data_check.max_bad_fraction=0.6",
        "--step_scheduler.max_steps=2", "--dataloader.num_workers=1",
        env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dataset: skipping 6 of 11 samples (on_bad_sample: skip)" in result.stdout
    # 2 steps x 4 samples > 5 good samples: the truncated JPEG is drawn and replaced.
    assert "WARNING: skipped dataset sample" in result.stderr
    logged = _bad_log(ckpt)
    assert [r["stage"] for r in logged].count("scan") == len(BAD_LINES)
    assert [r["stage"] for r in logged].count("decode") >= 1
    assert (ckpt / "final_model" / "model.safetensors").is_file()


def test_cli_data_check_lists_bad_samples_and_fails(tiny_gemma3, bad_folder, tmp_path):
    report = tmp_path / "report.json"
    result = run_cli(
        "data", "check", "-c", IMAGE_TEXT_YAML,
        *_cli_overrides(tiny_gemma3, bad_folder / "train.jsonl", tmp_path / "ckpt"),
        "--json", report, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for line in BAD_LINES:
        assert f"train.jsonl:{line}: {EXPECTED[line]}" in out or f"train.jsonl:{line}:" in out
    assert "train.jsonl:11:" in out and "(on decode)" in out  # found by the full decode
    assert "text tokens: min" in out and "image tokens: min 18" in out
    assert "data check: FAILED" in out
    data = json.loads(report.read_text())["datasets"]["dataset"]
    assert data["num_samples"] == 11 and data["num_bad"] == len(BAD_LINES) + 1
    assert data["allowed_bad"] == 0 and data["ok"] is False


def test_show_renders_every_row_of_a_thinking_templates_sample(tiny_family):
    """Qwen3.5 trains a two-reply sample as two rows; --show prints both, each marked."""
    from transformers import AutoProcessor

    from automodel.datasets.collate import default_collate_fn
    from automodel.datasets.data_check import format_samples, show_samples

    processor = AutoProcessor.from_pretrained(tiny_family("qwen3_5"))
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello again."}]},
    ]
    dataset = [{"conversation": conversation}]

    def collate(batch, **kwargs):
        return default_collate_fn(batch, processor, **kwargs)

    shown = show_samples(dataset, "dataset", collate, processor, 1)
    assert [s["where"].endswith(f"row {r} of 2") for r, s in enumerate(shown, 1)] == [True, True]
    text = format_samples("dataset", shown)
    assert "⟦Hello.<|im_end|>⟧" in text and "⟦Hello again.<|im_end|>⟧" in text
