"""A LoRA fine-tune at the size users fine-tune, through the CLI, with its memory accounted.

    python benchmarks/real_shape.py --smoke                # small widths: the pipeline in minutes
    python benchmarks/real_shape.py --model gemma3         # Gemma 3 4B's shape (hours on a CPU)
    python benchmarks/real_shape.py --layers 2             # real widths and vocabularies, 2 layers
    python benchmarks/real_shape.py --device cuda          # on a GPU: peak CUDA memory, tokens/s, MFU

For each model (``gemma3``: Gemma 3 4B's shape; ``qwen2_5_vl``: Qwen2.5-VL 3B's), a random model
of that shape is built once in bfloat16 (the weights are created in bf16, never as an fp32 copy;
with ``--device cuda`` they are drawn on the GPU, seconds instead of minutes) and cached, keyed on
its sizes; its tokenizer, processor and chat template are the tiny twin's
(the hub template verbatim), the vocabulary grown to the real size. Then, each step a fresh
process, timed and its resident memory sampled:

- train: ``python -m automodel finetune vlm -c CFG`` with LoRA r16 / alpha 32 over the bf16
  weights, activation checkpointing, the chunked loss, ``--steps`` steps (default 3) of 2
  samples, each one real-size image (896x896 for Gemma 3, 1024x768 for Qwen) and an answer of
  about 150 tokens; a step checkpoint at ``steps - 1``; ``final_adapter`` and ``final_model``;
- resume: the ``steps - 1`` checkpoint copied into a fresh ``checkpoint_dir`` and the same
  command rerun: it resumes and runs the last step, whose loss and ``final_adapter`` must equal
  the uninterrupted run's;
- merge: ``automodel export merge-lora`` of ``final_adapter`` into the base (bf16 in, bf16 out;
  compared with the run's own ``final_model``);
- generate: ``automodel generate`` of 8 tokens from the merged folder.

Each phase reports its wall time, its peak resident memory (the child's ``ru_maxrss``, exact)
and, on a GPU, its peak CUDA memory (``torch.cuda.max_memory_allocated``); the training phase is
split at the lines it prints (setup, each step, the final saves) with the resident memory sampled
every 0.2 s. Each step reports its seconds, tokens/s (as the run logs it) and MFU: the step's
model FLOPs (``benchmarks/shapes.py``: ``train_flops`` for the decoder, the frozen tower's
forward per image, from the samples' token counts through the training collate) per second over
the device's dense bf16 peak (``PEAK_TFLOPS`` or ``--peak-tflops``). The weight bytes are the
bf16 model's safetensors. One line per model reads ``real_shape: model=... step_s=...
tokens_per_s=... mfu=... cuda_peak_gb=...`` (medians of the steps after the first); the last
line reads ``real_shape: peak_gb=... weights_gb=... ratio=...`` for the model and phase with the
highest peak / weights ratio (on a GPU, peak CUDA memory of training); GB here are 2**30 bytes.

On a CPU without bf16 instructions (AVX2 only), bf16 matrix products run several times slower
than fp32 ones, and a real-shape step takes hours: see docs/performance.md, "Real shape on a CPU".
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.shapes import (
    GEMMA3_4B,
    peak_tflops,
    qwen_tower_flops,
    sample_counts,
    sizes_from_config,
    tower_flops,
    train_flops,
)

GIB = 2**30
LORA_RANK = 16

# Qwen2.5-VL 3B (Qwen/Qwen2.5-VL-3B-Instruct). Text sizes and tied embeddings from its
# config.json (revision b318d0972a0bfe62f64d49e1fe95e4fd39292261, as recorded in the copy at
# huggingface.co/zyoNoob/Qwen2.5-VL-3B-Instruct-AWQ/blob/main/config.json): hidden 2048,
# intermediate 11008, 36 layers, 16 heads, 2 KV heads, vocabulary 151,936, mRoPE [16, 24, 24],
# vision out_hidden_size 2048 and hidden_size 1280. The tower's other sizes are not in that file
# and come from transformers' Qwen2_5_VLVisionConfig defaults (transformers 5.24,
# models/qwen2_5_vl/configuration_qwen2_5_vl.py): depth 32, intermediate 3420, 16 heads,
# window 112, full attention in blocks 7, 15, 23, 31. Image settings from its
# preprocessor_config.json (as in Qwen/Qwen2.5-VL-3B-Instruct-AWQ's, huggingface.co @ 649c61c):
# patch 14, merge 2, min_pixels 3,136, max_pixels 12,845,056.
QWEN2_5_VL_3B = {
    "vocab_size": 151_936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "mrope_section": [16, 24, 24],
    "max_position_embeddings": 128_000,
    "tie_word_embeddings": True,
    "vision_hidden_size": 1280,
    "vision_intermediate_size": 3420,
    "vision_num_hidden_layers": 32,
    "vision_num_attention_heads": 16,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "patch_size": 14,
    "min_pixels": 3136,
    "max_pixels": 12_845_056,
}
# --smoke: the twins' own small widths and vocabularies (the same pipeline, minutes on a CPU).
SMOKE = {
    "gemma3": {},
    "qwen2_5_vl": {"tie_word_embeddings": True, "max_pixels": 64 * 28 * 28},
}


class Model:
    """One benchmarked model: its twin family, real sizes, image and example config."""

    def __init__(self, family: str, sizes: dict, image: tuple[int, int], attention: str | dict):
        self.family, self.sizes, self.image, self.attention = family, sizes, image, attention


MODELS = {
    # The example configs' attention (gemma3_4b_it_cord_v2_peft.yaml: eager in the decoder, sdpa
    # in the tower; qwen2_5_vl_3b_instruct_cord_v2_peft.yaml: sdpa).
    "gemma3": Model(
        "gemma3", GEMMA3_4B, (896, 896), {"text_config": "eager", "vision_config": "sdpa"}
    ),
    "qwen2_5_vl": Model("qwen2_5_vl", QWEN2_5_VL_3B, (1024, 768), "sdpa"),
}

WORDS = [
    *("total", "cash", "change", "coffee", "latte", "tea", "croissant", "muffin", "bagel"),
    *("water", "juice", "sandwich", "salad", "soup", "cake", "cookie", "tax", "service"),
    *("card", "visa", "receipt", "table", "server", "item", "price", "qty", "discount"),
]
PROMPT = "Read the receipt."

# Runs the CLI in the child (as ``python -m automodel``) and, when CUDA was used, prints the
# device's name and the process's peak CUDA memory as it exits.
CHILD = """
import atexit, runpy, sys
def _cuda_peak():
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        print(f"real_shape: cuda_device={torch.cuda.get_device_name()}", flush=True)
        print(f"real_shape: cuda_peak_bytes={torch.cuda.max_memory_allocated()}", flush=True)
atexit.register(_cuda_peak)
sys.argv = ["automodel", *sys.argv[1:]]
runpy.run_module("automodel", run_name="__main__", alter_sys=True)
"""


# ------------------------------------------------------------------------------ shapes
def model_sizes(name: str, smoke: bool, layers: int | None) -> dict:
    """The twin overrides for ``name``: the real sizes, the twin's (``smoke``), or the real
    widths with ``layers`` text and vision layers."""
    if smoke:
        return dict(SMOKE[name])
    sizes = dict(MODELS[name].sizes)
    if layers is not None:
        sizes["num_hidden_layers"] = sizes["vision_num_hidden_layers"] = layers
        if "fullatt_block_indexes" in sizes:
            kept = [i for i in sizes["fullatt_block_indexes"] if i < layers]
            sizes["fullatt_block_indexes"] = kept or [layers - 1]
    return sizes


def build_model(
    name: str, sizes: dict, cache: Path, out: Path, env: dict, device: str
) -> tuple[Path, dict]:
    """The bf16 model folder of ``sizes``, its weights drawn on ``device`` (built by a child
    process unless cached), and the build's phase record."""
    # A GPU's generator draws other bytes than the CPU's: another folder.
    keyed = sizes if device == "cpu" else {**sizes, "drawn_on": device}
    key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache / f"{name}-{key}"
    call = (
        "import json, sys; from automodel.twins import make_tiny; "
        f"make_tiny({MODELS[name].family!r}, sys.argv[1], seed=0, reuse=True, "
        f"dtype='bfloat16', device={device!r}, **json.loads(sys.argv[2]))"
    )
    argv = [sys.executable, "-c", call, str(folder), json.dumps(sizes)]
    record = run_phase("build", argv, out / "build.log", env)
    return folder, record


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def safetensors_dtypes(folder: Path) -> set[str]:
    """The dtypes stored in a folder's safetensors files (read from their headers)."""
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


# ------------------------------------------------------------------------------ data
def make_data(out: Path, n: int, image: tuple[int, int], model_dir: Path, seed: int = 0) -> dict:
    """``n`` one-image conversations whose answers are about 150 tokens of the model's tokenizer.

    Returns:
        The JSONL path and the answers' token counts.
    """
    from PIL import Image, ImageDraw
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    counts = []
    with open(out / "train.jsonl", "w") as f:
        for i in range(n):
            picture = Image.new("RGB", image, tuple(rng.randrange(256) for _ in "rgb"))
            draw = ImageDraw.Draw(picture)
            for _ in range(40):
                x, y = rng.randrange(image[0]), rng.randrange(image[1])
                colour = tuple(rng.randrange(256) for _ in "rgb")
                draw.rectangle([x, y, x + 60, y + 24], fill=colour)
            picture.save(out / f"img_{i}.png")
            words: list[str] = []
            while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < 150:
                words += [rng.choice(WORDS), f"{rng.randrange(1, 100)}.{rng.randrange(100):02d}"]
            answer = " ".join(words)
            counts.append(len(tokenizer(answer, add_special_tokens=False).input_ids))
            user = [{"type": "image", "image": f"img_{i}.png"}, {"type": "text", "text": PROMPT}]
            reply = [{"type": "text", "text": answer}]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return {"path": out / "train.jsonl", "answer_tokens": counts}


def sample_flops(model_dir: Path, data: Path) -> dict:
    """Tokens and model FLOPs per sample of a LoRA step on ``data``, counted through the
    training collate (as in ``write_config``: one sample at a time, ``max_length`` 2048).

    Returns:
        ``tokens``, ``label_tokens`` and ``image_tokens`` (means per sample) and
        ``flops_per_token`` (all samples' FLOPs over all their tokens).
    """
    sizes = sizes_from_config(json.loads((model_dir / "config.json").read_text()))
    counts, flops = sample_counts(model_dir, data, max_length=2048), 0
    for tokens, labels, images in counts:
        if "image_size" in sizes:  # a SigLIP tower: a fixed patch grid per image
            tower = tower_flops(sizes)
        else:  # Qwen2.5-VL: each image token merges a square of patches
            tower = qwen_tower_flops(sizes, images * sizes["spatial_merge_size"] ** 2)
        flops += train_flops(sizes, tokens, labels, LORA_RANK) + tower
    tokens, labels, images = (sum(c) / len(counts) for c in zip(*counts))
    return {
        "tokens": tokens,
        "label_tokens": labels,
        "image_tokens": images,
        "flops_per_token": flops / sum(c[0] for c in counts),
    }


def write_config(path: Path, name: str, model_dir: Path, data: Path, run_dir: Path, steps: int):
    """The fine-tuning config: the model's example ``*_cord_v2_peft.yaml`` on the generated
    data, for ``steps`` steps of 2 samples with a checkpoint at ``steps - 1``."""
    import yaml

    cfg = {
        "recipe": "FinetuneRecipeForVLM",
        "model": {
            "_target_": "automodel.models.AutoModelForImageTextToText.from_pretrained",
            "pretrained_model_name_or_path": str(model_dir),
            "torch_dtype": "bfloat16",
            "attn_implementation": MODELS[name].attention,
        },
        "peft": {
            "_target_": "automodel.peft.LoraConfig",
            "r": LORA_RANK,
            "alpha": 2 * LORA_RANK,
            "dropout": 0.0,
        },
        "dataset": {
            "_target_": "automodel.datasets.vlm.make_conversation_dataset",
            "path_or_dataset": str(data),
        },
        "dataloader": {
            "_target_": "torchdata.stateful_dataloader.StatefulDataLoader",
            # One process: its peak resident memory is the run's.
            "num_workers": 0,
            "collate_fn": {
                "_target_": "automodel.datasets.collate.default_collate_fn",
                "max_length": 2048,
            },
        },
        "loss_fn": {"_target_": "automodel.loss.ChunkedCrossEntropy"},
        "step_scheduler": {
            "global_batch_size": 2,
            "local_batch_size": 2,
            "max_steps": steps,
            "log_every_steps": 1,
            "ckpt_every_steps": max(1, steps - 1),
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.01},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "cosine"},
        "freeze_config": {"freeze_vision_tower": True, "freeze_embeddings": True},
        "distributed": {"activation_checkpointing": True},
        "checkpoint": {"checkpoint_dir": str(run_dir)},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ phases
def rss_bytes(pid: int) -> int:
    """A process's resident memory now (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_phase(name: str, argv: list[str], log: Path, env: dict) -> dict:
    """Runs one child to its end; its output goes to ``log`` and is echoed, each line with the
    seconds since the start and the child's RSS then (``log`` with ``.rss`` appended gets every
    sample as it is taken, so a run stopped half-way still leaves its memory timeline).

    Returns:
        ``seconds``, ``peak_rss`` (bytes: the child's own ``ru_maxrss``), ``cuda_peak`` (bytes
        or None), ``lines`` ([(seconds, text)]) and ``samples`` ([(seconds, RSS bytes)], every
        0.2 s).
    """
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int]] = []
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    done = threading.Event()

    def sample() -> None:
        with open(f"{log}.rss", "w") as sink:
            while not done.wait(0.2):
                samples.append((time.perf_counter() - start, rss_bytes(proc.pid)))
                sink.write(f"{samples[-1][0]:.1f}\t{samples[-1][1]}\n")
                sink.flush()

    def read() -> None:
        with open(log, "w") as sink:
            for text in proc.stdout:
                t = time.perf_counter() - start
                lines.append((t, text.rstrip("\n")))
                stamped = f"[{name} {t:8.1f}s {rss_bytes(proc.pid) / GIB:6.2f} GiB] {text}"
                sink.write(stamped)
                sink.flush()
                print("  " + stamped, end="", flush=True)

    threads = [threading.Thread(target=sample), threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    # wait4 reaps this child and gives its own resource use: ru_maxrss is its peak RSS.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); its output: {log}")
    cuda = [t for _, t in lines if t.startswith("real_shape: cuda_peak_bytes=")]
    names = [t for _, t in lines if t.startswith("real_shape: cuda_device=")]
    return {
        "seconds": seconds,
        "peak_rss": usage.ru_maxrss * 1024,
        "cuda_peak": int(cuda[-1].split("=")[1]) if cuda else None,
        "cuda_device": names[-1].split("=", 1)[1] if names else None,
        "lines": lines,
        "samples": samples,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", CHILD, *args]


def train_account(record: dict) -> list[tuple[str, float, int]]:
    """The training child's memory by part: (part, seconds into the run, peak RSS over it),
    cut at the lines it prints: the summary after setup, each step, each save."""
    marks = []
    for t, text in record["lines"]:
        if text.startswith("parameters:"):
            marks.append(("setup (load, LoRA, data)", t))
        elif re.match(r"step \d+/\d+ ", text):
            marks.append((f"step {text.split()[1].split('/')[0]}", t))
        elif text.startswith("saved checkpoint"):
            marks.append(("step checkpoint", t))
        elif text.startswith("saved") and text.rstrip("/").endswith("final_adapter"):
            marks.append(("final_adapter", t))
        elif text.startswith("saved") and text.rstrip("/").endswith("final_model"):
            marks.append(("merge + final_model", t))
    marks.append(("loss.png, exit", record["seconds"]))
    account, begin = [], 0.0
    for part, end in marks:
        inside = [rss for t, rss in record["samples"] if begin <= t <= end]
        # A part shorter than the sampling interval: the first sample after it.
        after = [rss for t, rss in record["samples"] if t > end][:1]
        account.append((part, end, max(inside or after or [0])))
        begin = end
    return account


def step_seconds(record: dict) -> list[float]:
    """Seconds of each step, from the times its log lines appeared (the first from setup's end;
    a step checkpoint's save counts in the next step)."""
    times = [t for part, t, _ in train_account(record) if re.match(r"setup|step \d", part)]
    return [b - a for a, b in itertools.pairwise(times)]


def training_log(run_dir: Path) -> list[dict]:
    path = run_dir / "training.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def max_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between two folders' safetensors weights (inf when
    their names or shapes differ)."""
    from safetensors import safe_open

    worst = 0.0
    files_a, files_b = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if [p.name for p in files_a] != [p.name for p in files_b]:
        return float("inf")
    for path_a, path_b in zip(files_a, files_b):
        with safe_open(path_a, "pt") as fa, safe_open(path_b, "pt") as fb:
            names = sorted(fa.keys())
            if names != sorted(fb.keys()):
                return float("inf")
            for key in names:
                x, y = fa.get_tensor(key), fb.get_tensor(key)
                if x.shape != y.shape:
                    return float("inf")
                worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0)
    return worst


# ------------------------------------------------------------------------------ one model
def bench_model(name: str, ns: argparse.Namespace, env: dict) -> dict:
    """Every phase for one model; returns the figures."""
    out = ns.out / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sizes = model_sizes(name, ns.smoke, ns.layers)
    print(f"== {name}: {json.dumps(sizes)}", flush=True)
    model_dir, build = build_model(name, sizes, ns.cache, out, env, ns.device)
    weights = safetensors_bytes(model_dir)
    result = {"model": name, "sizes": sizes, "weights": weights, "phases": {"build": build}}
    print(
        f"{name}: {model_dir}, {weights / GIB:.3f} GiB of weights in {safetensors_dtypes(model_dir)}"
    )

    data = make_data(out / "data", 2 * ns.steps, MODELS[name].image, model_dir)
    result["answer_tokens"] = data["answer_tokens"]
    result["per_sample"] = sample_flops(model_dir, data["path"])
    train_dir, resume_dir = out / "train", out / "resume"
    config = write_config(out / "config.yaml", name, model_dir, data["path"], train_dir, ns.steps)
    resume_config = write_config(
        out / "resume.yaml", name, model_dir, data["path"], resume_dir, ns.steps
    )

    train = run_phase("train", cli("finetune", "vlm", "-c", str(config)), out / "train.log", env)
    result["phases"]["train"] = train
    result["train_log"] = training_log(train_dir)
    result["account"] = train_account(train)
    result["step_seconds"] = step_seconds(train)
    result["device_name"] = train["cuda_device"] or "cpu"
    result["peak_tflops"] = ns.peak_tflops or peak_tflops(result["device_name"])
    print(steady(result), flush=True)  # the training figures, even if a later phase fails

    if ns.steps >= 2 and not ns.no_resume:
        step_dir = f"step_{ns.steps - 1:06d}"
        resume_dir.mkdir(parents=True)
        shutil.copytree(train_dir / step_dir, resume_dir / step_dir)
        (resume_dir / "LATEST").write_text(step_dir + "\n")
        resume = run_phase(
            "resume", cli("finetune", "vlm", "-c", str(resume_config)), out / "resume.log", env
        )
        result["phases"]["resume"] = resume
        resumed = {r["step"]: r["loss"] for r in training_log(resume_dir)}
        straight = {r["step"]: r["loss"] for r in result["train_log"]}
        result["resume"] = {
            "loss": resumed.get(ns.steps),
            "uninterrupted_loss": straight.get(ns.steps),
            "adapter_max_diff": max_difference(
                train_dir / "final_adapter", resume_dir / "final_adapter"
            ),
        }
        shutil.rmtree(resume_dir / "final_model", ignore_errors=True)

    merged = out / "merged"
    merge_args = ["export", "merge-lora", "--base", str(model_dir)]
    merge_args += ["--adapter", str(train_dir / "final_adapter"), "--out", str(merged)]
    result["phases"]["merge"] = run_phase("merge", cli(*merge_args), out / "merge.log", env)
    result["merged"] = {
        "bytes": safetensors_bytes(merged),
        "dtypes": sorted(safetensors_dtypes(merged)),
        "max_diff_to_final_model": max_difference(merged, train_dir / "final_model"),
    }
    if not ns.keep:
        shutil.rmtree(train_dir / "final_model", ignore_errors=True)

    image = out / "data" / "img_0.png"
    gen_args = ["generate", "--model", str(merged), "--image", str(image), "--prompt", PROMPT]
    generate = run_phase("generate", cli(*gen_args, "--max-new-tokens", "8"), out / "gen.log", env)
    result["phases"]["generate"] = generate
    if not ns.keep:
        shutil.rmtree(merged, ignore_errors=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------------------ report
def report(result: dict, device: str) -> list[tuple[float, float, str]]:
    """Prints one model's figures; returns (peak bytes, ratio, phase) for each measured phase."""
    name, weights = result["model"], result["weights"]
    phases = result["phases"]
    print(f"\n{name}: weights {weights / GIB:.3f} GiB (bf16 safetensors)")
    rows = []
    for phase in ("build", "train", "resume", "merge", "generate"):
        record = phases.get(phase)
        if record is None:
            continue
        line = (
            f"  {phase:8} {record['seconds']:8.1f} s  peak RSS {record['peak_rss'] / GIB:6.2f} GiB"
        )
        line += f" ({record['peak_rss'] / weights:.2f}x weights)"
        peak = record["peak_rss"]
        if record["cuda_peak"] is not None:
            line += f"  peak CUDA {record['cuda_peak'] / GIB:6.2f} GiB"
            line += f" ({record['cuda_peak'] / weights:.2f}x)"
            peak = record["cuda_peak"] if device == "cuda" else peak
        print(line)
        if phase != "build":  # the benchmark's own model building is not a user's run
            rows.append((peak, peak / weights, phase))
    per, peak_tflops = result["per_sample"], result["peak_tflops"]
    print(
        f"  per sample: {per['tokens']:.0f} tokens ({per['label_tokens']:.0f} labelled, "
        f"{per['image_tokens']:.0f} image tokens), {per['flops_per_token'] / 1e9:.2f} GFLOP per "
        f"token; peak {peak_tflops or 'unknown'} TFLOP/s ({result['device_name']})"
    )
    print("  steps (seconds from the log lines, the first from setup's end with warm-up):")
    for seconds, r in zip(result["step_seconds"], result["train_log"]):
        print(
            f"    step {r['step']}: {seconds:.2f} s, loss {r['loss']:.6f}, "
            f"{r['tokens_per_s']:.1f} tokens/s, MFU {percent(mfu(r, result))}, "
            f"logged peak {r['peak_memory_gb']:.2f} GiB"
        )
    print(f"  answer tokens per sample: {result['answer_tokens']}")
    print("  training run, peak RSS by part (GiB):")
    for part, end, peak in result["account"]:
        print(f"    {part:28} until {end:8.1f} s  {peak / GIB:6.2f}")
    if "resume" in result:
        r = result["resume"]
        same = r["loss"] == r["uninterrupted_loss"] and r["adapter_max_diff"] == 0.0
        print(
            f"  resume: last-step loss {r['loss']} vs uninterrupted {r['uninterrupted_loss']}; "
            f"final_adapter max difference {r['adapter_max_diff']:g} -> "
            f"{'exact' if same else 'NOT exact'}"
        )
    m = result["merged"]
    print(
        f"  merged: {m['bytes'] / GIB:.2f} GiB in {m['dtypes']}; max difference to the run's "
        f"final_model {m['max_diff_to_final_model']:g}"
    )
    reply = [t for _, t in phases["generate"]["lines"] if not t.startswith("real_shape:")]
    print(f"  generated: {reply[-1] if reply else ''!r}")
    return rows


def mfu(step: dict, result: dict) -> float | None:
    """A logged step's model FLOPs utilisation (None without a known peak)."""
    if not result["peak_tflops"]:
        return None
    flops = step["tokens_per_s"] * result["per_sample"]["flops_per_token"]
    return flops / (result["peak_tflops"] * 1e12)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def steady(result: dict) -> str:
    """The model's key figures, medians of the steps after the first (its warm-up), as one line."""
    log, seconds = result["train_log"], result["step_seconds"]
    log, seconds = (log[1:], seconds[1:]) if len(log) > 1 else (log, seconds)
    step = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in log)} if log else None
    cuda = result["phases"]["train"]["cuda_peak"]
    return (
        f"real_shape: model={result['model']} "
        f"step_s={statistics.median(seconds) if seconds else float('nan'):.2f} "
        f"tokens_per_s={step['tokens_per_s'] if step else float('nan'):.1f} "
        f"mfu={percent(mfu(step, result) if step else None)} "
        f"cuda_peak_gb={'n/a' if cuda is None else f'{cuda / GIB:.2f}'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument("--layers", type=int, help="text and vision layers (real widths)")
    parser.add_argument("--smoke", action="store_true", help="the twins' small sizes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no-resume", action="store_true", help="skip the resume check")
    parser.add_argument("--keep", action="store_true", help="keep final_model and merged")
    parser.add_argument("--out", type=Path, default=Path("/tmp/real_shape"))
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU")
    cache = Path(os.environ.get("AUTOMODEL_CACHE", ROOT / ".cache" / "automodel"))
    parser.add_argument("--cache", type=Path, default=cache / "real_shape")
    ns = parser.parse_args()
    if ns.steps < 1:
        parser.error("--steps must be at least 1")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if ns.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    names = list(MODELS) if ns.model == "all" else [ns.model]
    rows, lines = [], []
    for name in names:  # one at a time: two real-shape models do not fit a 24 GB machine
        result = bench_model(name, ns, env)
        rows += [(*row, result) for row in report(result, ns.device)]
        lines.append(steady(result))
    print()
    print("\n".join(lines))
    peak, ratio, phase, result = max(rows, key=lambda row: row[1])
    print(
        f"real_shape: peak_gb={peak / GIB:.2f} weights_gb={result['weights'] / GIB:.2f} "
        f"ratio={ratio:.2f} ({result['model']}, {phase})"
    )


if __name__ == "__main__":
    main()
