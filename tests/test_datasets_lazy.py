"""Laziness: a 100k-line JSONL starts within seconds and memory stays flat while iterating."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
import torch.utils.data
from PIL import Image

from automodel.datasets.checks import screen_dataset
from automodel.datasets.collate import default_collate_fn
from automodel.datasets.vlm import make_image_text_dataset

LINES = 100_000
MB = 2**20


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory) -> Path:
    """100k records over 4 distinct 128x128 images (each decodes to 48 KB of RGB)."""
    root = tmp_path_factory.mktemp("big")
    (root / "images").mkdir()
    for k in range(4):
        Image.effect_noise((128, 128), 30 + 10 * k).convert("RGB").save(
            root / "images" / f"{k}.png"
        )
    with open(root / "train.jsonl", "w") as f:
        f.writelines(
            json.dumps({"image": f"images/{i % 4}.png", "text": f"caption {i}"}) + "\n"
            for i in range(LINES)
        )
    return root / "train.jsonl"


def _rss(pids: list[int] | None = None) -> float:
    process = psutil.Process()
    procs = [process, *process.children(recursive=True)] if pids is None else pids
    return sum(p.memory_info().rss for p in procs) / MB


def test_100k_lines_start_within_seconds_and_decode_only_in_workers(
    big_jsonl, tiny_gemma3, monkeypatch
):
    from automodel.models.auto import load_processor

    processor = load_processor(str(tiny_gemma3))
    main_pid = os.getpid()
    original = Image.open

    def open_outside_main(*args, **kwargs):
        if os.getpid() == main_pid:
            opened_in_main.append(args[0])
        return original(*args, **kwargs)

    opened_in_main: list = []
    before = _rss()
    start = time.perf_counter()
    dataset = make_image_text_dataset(big_jsonl)
    built = time.perf_counter() - start
    built_rss = _rss() - before
    screened = screen_dataset(dataset, "dataset", None)  # the pre-training scan, every line
    scanned = time.perf_counter() - start
    monkeypatch.setattr(Image, "open", open_outside_main)
    loader = torch.utils.data.DataLoader(
        screened,
        batch_size=8,
        shuffle=True,
        num_workers=1,
        collate_fn=lambda b: default_collate_fn(b, processor, max_length=128),
    )
    batch = next(iter(loader))
    first_batch = time.perf_counter() - start
    print(f"built {built:.2f}s (+{built_rss:.1f} MB), scanned {scanned:.2f}s, first batch "
          f"{first_batch:.2f}s")  # fmt: skip
    assert len(screened) == LINES and batch["input_ids"].shape[0] == 8
    assert built < 3, f"indexing {LINES} lines took {built:.1f}s"
    assert built_rss < 40, f"the index of {LINES} lines costs {built_rss:.0f} MB"
    assert first_batch < 20, f"the first batch took {first_batch:.1f}s"
    assert opened_in_main == [], "images were decoded in the main process"


def test_memory_stays_flat_while_iterating(big_jsonl):
    dataset = screen_dataset(make_image_text_dataset(big_jsonl), "dataset", None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=50, shuffle=True, num_workers=0, collate_fn=lambda b: len(b)
    )
    it = iter(loader)
    for _ in range(4):  # warm-up: allocator pools, PIL plugins
        next(it)
    before = _rss()
    seen = sum(next(it) for _ in range(40))  # 2,000 decoded samples, 96 MB if kept
    grown = _rss() - before
    print(f"RSS growth over {seen} samples: {grown:.1f} MB")
    assert seen == 2000 and grown < 24, f"RSS grew {grown:.1f} MB over {seen} samples"


@pytest.mark.slow
def test_memory_stays_flat_over_a_whole_epoch_with_workers(big_jsonl):
    dataset = screen_dataset(make_image_text_dataset(big_jsonl), "dataset", None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=100, shuffle=True, num_workers=2, collate_fn=lambda b: len(b),
        persistent_workers=False,
    )  # fmt: skip
    samples, readings = 0, []
    start = time.perf_counter()
    for i, n in enumerate(loader):
        samples += n
        if i == 20 or i % 200 == 0:
            readings.append(_rss())
    seconds = time.perf_counter() - start
    print(f"epoch of {samples} samples in {seconds:.0f}s; RSS (main + workers, MB): {readings}")
    assert samples == LINES
    assert max(readings[1:]) - readings[1] < 64, readings
