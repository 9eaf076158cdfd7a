"""Batched generation, ``automodel evaluate``, evaluation during training and ``generate``'s
folder / JSONL modes, on the tiny Gemma 3 twin and synthetic receipts."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli

QUICKSTART = ROOT / "examples/vlm/quickstart.yaml"


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def model_and_data(tiny_gemma3, receipts):
    from automodel.datasets.vlm import make_cord_v2_dataset
    from automodel.models.auto import AutoModelForImageTextToText, load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_gemma3))
    processor = load_processor(str(tiny_gemma3))
    dataset = make_cord_v2_dataset(str(receipts), split="validation")
    return model, processor, dataset


def test_batched_generation_equals_one_by_one(model_and_data):
    from automodel.generation import generate_replies, generate_reply, prompt_messages

    model, processor, dataset = model_and_data
    # The twin's processor pads on the right by default; generation must pad on the left.
    assert processor.tokenizer.padding_side == "right"
    prompts = [prompt_messages(dataset[i]["conversation"]) for i in range(3)]
    # Prompts of different lengths, so the batch really is padded.
    prompts[1] = [
        {
            **prompts[1][0],
            "content": [prompts[1][0]["content"][0], {"type": "text", "text": "Read."}],
        }
    ]
    batched = generate_replies(model, processor, prompts, max_new_tokens=12, batch_size=3)
    single = [generate_reply(model, processor, p, max_new_tokens=12) for p in prompts]
    assert batched == single
    assert all(batched), "a random twin still generates some text"


def test_evaluate_scores_and_records_every_sample(model_and_data):
    from automodel.eval.evaluate import default_metrics, evaluate

    model, processor, dataset = model_and_data
    assert default_metrics(dataset)[0] == "cord"
    result = evaluate(model, processor, dataset, max_samples=3, max_new_tokens=8, keep_images=2)
    assert set(result.scores) >= {"field_f1", "nted_accuracy", "json_valid"}
    assert [r["index"] for r in result.records] == [0, 1, 2]
    assert json.loads(result.records[0]["reference"]) == dataset.gt_parse(0)
    assert "image" in result.records[1] and "image" not in result.records[2]


def test_default_metrics_and_samples_without_an_answer(model_and_data):
    from automodel.errors import UsageError
    from automodel.eval.evaluate import default_metrics, evaluate

    model, processor, dataset = model_and_data

    class Wrapper:  # as the training run's screened dataset: the built one in .dataset
        def __init__(self, inner):
            self.dataset = inner

    class Captions(list):
        default_metric = "caption"

    assert default_metrics(Wrapper(dataset))[0] == "cord"
    assert default_metrics(Captions()) == ["bleu4", "cider"]
    assert default_metrics([]) == ["exact_match", "anls"]
    question = dataset[0]["conversation"][:1]
    with pytest.raises(UsageError, match="sample 0 ends with a user turn"):
        evaluate(model, processor, [{"conversation": question}], max_new_tokens=2)


def test_evaluate_cli_writes_metrics_predictions_and_a_table(tmp_path, tiny_gemma3, receipts):
    out = tmp_path / "ev"
    result = _ok(
        run_cli(
            "evaluate",
            "-c",
            QUICKSTART,
            "--model",
            tiny_gemma3,
            "--max-samples",
            "3",
            "--out",
            out,
            "~prepare",
            f"--validation_dataset.path_or_dataset={receipts}",
            "--eval.max_new_tokens=8",
            "--eval.metrics=[cord, exact_match]",
        )
    )
    assert "| field_f1 |" in result.stdout and "| exact_match |" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 3 and metrics["split"] == "validation"
    assert metrics["metrics"] == ["cord", "exact_match"]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert all({"prompt", "reference", "prediction", "scores"} <= set(r) for r in rows)
    assert (out / rows[0]["image"]).is_file()


def test_evaluate_cli_rejects_bad_input(tmp_path, tiny_gemma3, receipts, capsys):
    from automodel.cli import main

    args = ["evaluate", "-c", str(QUICKSTART), "~prepare"]
    assert main(args) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main([*args, "--model", "m", "--max-samples", "0"]) == 2
    assert "--max-samples 0: give a positive integer" in capsys.readouterr().err
    data = f"--validation_dataset.path_or_dataset={receipts}"
    assert main([*args, "--model", str(tiny_gemma3), data, "--eval.metrics=[bleu]"]) == 2
    assert "unknown metric 'bleu'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_with_eval(tmp_path_factory, tiny_gemma3, receipts):
    """A 4-step run that evaluates at steps 2 and 4."""
    out = tmp_path_factory.mktemp("evalrun")
    result = _ok(
        run_cli(
            "finetune",
            "vlm",
            "-c",
            QUICKSTART,
            "~prepare",
            f"--model.pretrained_model_name_or_path={tiny_gemma3}",
            f"--dataset.path_or_dataset={receipts}",
            f"--validation_dataset.path_or_dataset={receipts}",
            "--step_scheduler.max_steps=4",
            "--step_scheduler.global_batch_size=2",
            "--step_scheduler.local_batch_size=2",
            "--step_scheduler.eval_every_steps=2",
            "--step_scheduler.val_every_steps=2",
            "--eval.max_samples=3",
            "--eval.max_new_tokens=8",
            "--eval.gallery_size=2",
            "--eval.best_metric=nted_accuracy",
            "--dataloader.num_workers=0",
            "--preview.num_samples=0",
            f"--checkpoint.checkpoint_dir={out / 'checkpoints'}",
            cwd=out,
        )
    )
    return out / "checkpoints", result


def test_training_evaluates_on_schedule_and_logs_everywhere(run_with_eval):
    ckpt, result = run_with_eval
    records = [json.loads(x) for x in (ckpt / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(0.0 <= r["field_f1"] <= 1.0 for r in records)
    assert "eval step 4 (3 samples): field_f1" in result.stdout
    best = json.loads((ckpt / "eval_best.json").read_text())
    assert best["metric"] == "nted_accuracy"
    assert best["value"] == max(r["nted_accuracy"] for r in records)
    # A new best score gets a step checkpoint, and BEST names it (no ckpt_every_steps here).
    assert (ckpt / "BEST").read_text().strip() == f"step_{best['step']:06d}"
    assert (ckpt / f"step_{best['step']:06d}" / "model.safetensors").is_file()
    latest = json.loads((ckpt / "eval" / "metrics.json").read_text())
    assert latest["step"] == 4 and latest["num_samples"] == 3
    assert len(list((ckpt / "eval" / "images").glob("*.png"))) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(ckpt / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("eval/field_f1")]
    assert steps == [2, 4]


def test_report_cli_on_a_real_run_renders_in_chromium(run_with_eval, tmp_path):
    from tests.test_report import assert_renders

    ckpt, _ = run_with_eval
    result = _ok(run_cli("report", ckpt))
    page = ckpt / "report.html"
    assert result.stdout.strip() == str(page)
    text = page.read_text()
    assert "field_f1" in text and "Resolved config" in text
    assert_renders(page, tmp_path, images=2)


def test_periodic_evaluator_checks_its_settings(tmp_path, model_and_data):
    from automodel.config.sections import EvalConfig
    from automodel.errors import UsageError
    from automodel.eval.periodic import build_periodic_evaluator

    _, processor, dataset = model_and_data
    assert build_periodic_evaluator(EvalConfig(), None, processor, dataset, tmp_path) is None
    with pytest.raises(UsageError, match="no validation_dataset"):
        build_periodic_evaluator(EvalConfig(), 5, processor, None, tmp_path)
    with pytest.raises(UsageError, match="best_metric='bleu4' is not produced"):
        build_periodic_evaluator(EvalConfig(best_metric="bleu4"), 5, processor, dataset, tmp_path)
    evaluator = build_periodic_evaluator(
        EvalConfig(metrics=["vqa"]), 5, processor, dataset, tmp_path
    )
    assert evaluator.best_metric == "exact_match"
    assert [s for s in range(1, 13) if evaluator.due(s)] == [5, 10]


def test_generate_folder_and_jsonl_modes(tmp_path, tiny_gemma3, model_and_data):
    _, _, dataset = model_and_data
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        dataset[i]["conversation"][0]["content"][0]["image"].save(folder / f"r{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.jsonl"
    result = _ok(
        run_cli(
            "generate",
            "--model",
            tiny_gemma3,
            "--image",
            folder,
            "--prompt",
            "Read this receipt.",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--out",
            out,
        )
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r0.png", "r1.png", "r2.png"]
    assert all(r["prompt"] == "Read this receipt." and r["prediction"] for r in rows)
    assert "wrote 3 predictions" in result.stdout
    assert "generating" in result.stderr  # the progress bar

    from automodel.generation import generate_to_jsonl, read_generation_inputs

    model, processor, _ = model_and_data
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "a", "image": "images/r0.png", "prompt": "Total?"}\n\n{"image": "images/r1.png"}\n'
    )
    items = read_generation_inputs(jsonl=prompts, prompt="Read.")
    assert [(i["id"], i["prompt"]) for i in items] == [("a", "Total?"), (3, "Read.")]
    written = generate_to_jsonl(model, processor, items, tmp_path / "p2.jsonl", 6, progress=False)
    assert len(written.read_text().splitlines()) == 2


def test_generate_reports_bad_inputs(tmp_path, tiny_gemma3):
    from automodel.errors import UsageError
    from automodel.generation import read_generation_inputs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "prompt": "x"}\n')
    result = run_cli("generate", "--model", tiny_gemma3, "--jsonl", bad)
    assert result.returncode == 2 and "bad.jsonl:1: image not found" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images"):
        read_generation_inputs(image=empty, prompt="x")
    bad.write_text("[1, 2]\n")
    with pytest.raises(UsageError, match="bad.jsonl:1: expected a JSON object"):
        read_generation_inputs(jsonl=bad)
    with pytest.raises(UsageError, match="--prompt is required"):
        read_generation_inputs(image=bad)


def test_each_builder_names_its_default_metric(receipts):
    from automodel.datasets.vlm import (
        make_conversation_dataset,
        make_cord_v2_dataset,
        make_image_text_dataset,
        make_vqa_dataset,
    )
    from automodel.eval.evaluate import default_metrics
    from automodel.eval.metrics import expand_metric_names

    data = ROOT / "examples" / "data"
    cases = [
        (make_cord_v2_dataset(str(receipts), split="validation"), "cord"),
        (make_vqa_dataset(str(data / "vqa"), split="train"), "vqa"),
        (
            make_image_text_dataset(str(data / "image_text" / "train.jsonl"), split="train"),
            "caption",
        ),
        (
            make_conversation_dataset(str(data / "conversation" / "train.jsonl"), split="train"),
            "vqa",
        ),
    ]
    for dataset, group in cases:
        assert default_metrics(dataset) == expand_metric_names(group), type(dataset).__name__
