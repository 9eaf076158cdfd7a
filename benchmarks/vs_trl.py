"""automodel against TRL's SFTTrainer: the same fine-tune, side by side, in one run.

    python benchmarks/vs_trl.py                 # the headline: LoRA and full rows, bf16 autocast
    python benchmarks/vs_trl.py --device cuda   # the same on one GPU
    python benchmarks/vs_trl.py --fp32          # the same twin with fp32 matrix products (a CPU
                                                # without bf16 kernels; not the headline)
    python benchmarks/vs_trl.py --configs a,b   # the earlier twin, fp32 (--bf16, --image-tokens)
    python benchmarks/vs_trl.py --quick         # a smoke run: tiny model, 2 steps, 1 round
    python benchmarks/vs_trl.py --gpu           # CUDA: Gemma 3 4B's own shape in bf16, LoRA

The headline twin is Gemma 3 4B scaled down (``benchmarks/shapes.py``: widths and decoder depth
divided by 8, the 896 px image pooled to 256 tokens, the 262,144-token vocabulary, a frozen SigLIP
tower whose FLOPs relative to the decoder's are the real model's). Both sides train it over 8
one-image conversations with answers of 90 to 110 words for 3 epochs (12 steps of 2, the first
untimed), autocast to bf16 over fp32 weights, in two rows: LoRA (r 16, alpha 32, the language
model's linear layers; the headline) and full fine-tuning of the language model. The last line is
``speedup=X memory_ratio=Y`` of the LoRA row; each row's line says whether it meets speed >= 2.0x
and memory <= 0.5x TRL's.

The earlier twin (``--configs a,b``) is a ~22M-parameter Gemma 3 with (a) a small vocabulary and
(b) the real 262,144 tokens, 16 tokens per image, 32 conversations with answers of 3 to 90 words,
full fine-tuning in fp32 (``--bf16``: bf16 autocast); its last line reads speed on (a), memory
on (b).

On both, the sides share the data, the global batch, steps, learning rate and fused AdamW
(SFTConfig's default and automodel's), answer-only labels (TRL's ``assistant_only_loss``; the
label counts of both collates on the same batch are printed), the frozen vision tower, the
number of DataLoader workers and threads, and activation recomputation: none, unless
``--checkpointing`` turns it on for both (TRL's ``SFTConfig`` turns ``gradient_checkpointing`` on
by default, which trades its speed for memory). Each run reports its optimizer and whether it
recomputes, so a difference between the sides shows in the output.

Each run is a fresh subprocess (its peak RSS is its own), the sides alternate (automodel, TRL,
automodel, TRL, ...), warm-up steps are not timed, and the table shows the median of the rounds.
Each configuration prints a profile of both sides' timed steps, seconds per step in the tower,
the decoder, the loss, backward, the optimizer and waiting for data (``PhaseClock``). Rows
``automodel -<lever>`` switch one lever off on configuration (b) to show what it contributes; the
row ``TRL, its default recompute`` is one TRL run on (a) with ``gradient_checkpointing`` left on.
The automodel side also reports the share of the timed steps it waited for data and what its
data loader delivers alone. Ratios are the median over rounds of the ratio within a round.

On a CPU without native bf16 matrix products (AVX2 only) the bf16 settings stop at once in one
line: torch's fallback kernels run them many times slower than fp32 on both sides.

``--gpu`` runs configuration (b) on one CUDA device with a randomly initialised model of Gemma 3
4B's own shape, bf16 weights and autocast, and the same LoRA on both sides. On CUDA memory is
``torch.cuda.max_memory_allocated``, and MFU is the FLOPs a sample's training needs
(``benchmarks/shapes.py``: ``train_flops`` for the decoder, the tower's forward for its image; the
same count for both sides) times samples per second, over the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.shapes import (
    GEMMA3_4B,
    HEADLINE_TWIN,
    HEADLINE_VOCAB,
    peak_tflops,
    sample_counts,
    tower_flops,
    train_flops,
)

# ~22M parameters with the small vocabulary (a); the same model with 262k tokens is (b).
SIZES = {
    "hidden_size": 256,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vision_hidden_size": 384,
    "vision_intermediate_size": 1536,
    "vision_num_hidden_layers": 6,
    "vision_num_attention_heads": 6,
    "image_size": 192,
    "patch_size": 16,
    "mm_tokens_per_image": 16,
}
QUICK_SIZES = {
    **SIZES,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "vision_hidden_size": 64,
    "vision_intermediate_size": 128,
    "vision_num_hidden_layers": 1,
    "vision_num_attention_heads": 2,
    "image_size": 64,
}
# Gemma 3 4B's shape (a random model of it is built once, ~17 GB in fp32, for --gpu).
GPU_SIZES = {
    k: v for k, v in GEMMA3_4B.items() if k not in ("vocab_size", "max_position_embeddings")
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
# The language model's linear layers (what automodel's default LoRA targets), for TRL's PEFT.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Vocabulary of each configuration: the earlier twin (a, b) and the headline twin (lora, full).
CONFIGS = {"a": 2048, "b": 262144, "lora": HEADLINE_VOCAB, "full": HEADLINE_VOCAB}
HEADLINE = ("lora", "full")
# What one step spends its time on, the same hooks on both sides (see PhaseClock).
PHASES = ("tower", "decoder", "loss", "backward", "optimizer", "data")

# Levers of the automodel side; each "-lever" row turns one off.
LEVERS = {
    "chunked_ce": {"loss_fn": {"_target_": "automodel.loss.ChunkedCrossEntropy"}},
    "group_by_length": {"dataloader": {"group_by_length": True}},
    "vision_cache": {"vision_cache": {"enabled": True}},
    "packing": {"packing": {"enabled": True}},
    # Compiles in the warm-up steps (the first step, then once more for dynamic shapes); left out
    # of --quick (a smoke run) and --gpu (the 10-minute budget of a lent GPU).
    "compile": {"compile": {"enabled": True}},
    # Attention in fp32 under bf16 autocast on a CPU (only with --bf16; a no-op in fp32).
    "fp32_attention": {"precision": {"fp32_attention_on_cpu": True}},
}

WORDS = [
    *("total", "cash", "change", "coffee", "latte", "tea", "croissant", "muffin", "bagel"),
    *("water", "juice", "sandwich", "salad", "soup", "cake", "cookie", "tax", "service"),
    *("card", "visa", "receipt", "table", "server", "item", "price", "qty", "discount", "sub"),
]


# ------------------------------------------------------------------------------ preparation
def make_data(
    out_dir: Path, n: int, image_size: int, words: tuple[int, int], seed: int = 0
) -> Path:
    """``n`` one-image conversations with answers of ``words`` (a range) words, as OpenAI-style
    JSONL."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.jsonl"
    if path.exists():
        return path
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            image = Image.new(
                "RGB", (image_size, image_size), tuple(rng.randrange(256) for _ in "rgb")
            )
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x, y = rng.randrange(image_size), rng.randrange(image_size)
                draw.rectangle(
                    [x, y, x + 20, y + 12], fill=tuple(rng.randrange(256) for _ in "rgb")
                )
            image.save(out_dir / f"img_{i}.png")
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            record = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"img_{i}.png"},
                            {"type": "text", "text": "Read the receipt."},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            }
            f.write(json.dumps(record) + "\n")
    return path


def with_image_tokens(sizes: dict, tokens: int) -> dict:
    """``sizes`` with ``tokens`` tokens per image, the image grown when its patch grid needs it."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit(f"--image-tokens {tokens}: use a square (16, 64, 256)")
    patches = sizes["image_size"] // sizes["patch_size"]
    if patches % side:
        patches = side
    return {**sizes, "mm_tokens_per_image": tokens, "image_size": patches * sizes["patch_size"]}


def make_model(out_dir: Path, vocab_size: int, sizes: dict) -> Path:
    from automodel.twins import make_tiny

    make_tiny("gemma3", out_dir, seed=0, reuse=True, vocab_size=vocab_size, **sizes)
    return out_dir


# ------------------------------------------------------------------------------ the profile
class PhaseClock:
    """Seconds each side spends per phase of its timed steps, measured by the same hooks.

    - tower: inside the vision tower's call (on automodel's side, cache look-ups included);
    - decoder: inside the decoder's call (the transformer layers, not the output projection);
    - loss: the rest of the forward and loss: TRL's ``compute_loss`` or automodel's
      ``forward_loss`` less tower and decoder (the output projection, the cross-entropy, TRL's
      entropy and token accuracy over the logits, embedding and projector);
    - backward: ``Tensor.backward`` (recomputed activations included);
    - optimizer: gradient clipping and the optimizer's step;
    - data: waiting for the next batch (automodel's own data-wait clock; TRL's
      ``get_batch_samples``).

    On CUDA each reading synchronizes the device first.
    """

    def __init__(self, cuda: bool) -> None:
        import torch

        self.torch, self.cuda = torch, cuda
        self.seconds = dict.fromkeys((*PHASES, "forward"), 0.0)
        self.in_backward = False

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, start: float) -> None:
        self.seconds[phase] += self.now() - start

    def on_module(self, module, phase: str) -> None:
        """Times ``module``'s forward calls, not the reruns of a recomputing backward."""
        starts = []

        def before(_module, _args):
            if not self.in_backward:
                starts.append(self.now())

        def after(_module, _args, _output):
            if starts and not self.in_backward:
                self.add(phase, starts.pop())

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def on_call(self, owner, name: str, phase: str) -> None:
        """Times every call of ``owner.name`` (a function or bound method it holds)."""
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = self.now()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(phase, start)

        setattr(owner, name, timed)

    def attach(self, model) -> None:
        """Hooks on ``model``'s tower and decoder, on backward, clipping and optimizer steps."""
        from automodel.models.families import family_of, transformers_model
        from automodel.models.freeze import language_modules

        inner = transformers_model(model)
        self.on_module(inner.get_submodule(family_of(inner).cached_tower), "tower")
        self.on_module(language_modules(model)[0], "decoder")
        backward = self.torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            start, self.in_backward = self.now(), True
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                self.in_backward = False
                self.add("backward", start)

        self.torch.Tensor.backward = timed_backward
        self.on_call(self.torch.nn.utils, "clip_grad_norm_", "optimizer")
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        starts = []
        register_optimizer_step_pre_hook(lambda *_: starts.append(self.now()))
        register_optimizer_step_post_hook(lambda *_: self.add("optimizer", starts.pop()))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def per_step(self, steps: int) -> dict:
        """Seconds per step of each phase (``loss`` is the forward less tower and decoder)."""
        seconds = dict(self.seconds)
        forward = seconds.pop("forward")
        seconds["loss"] = max(0.0, forward - seconds["tower"] - seconds["decoder"])
        return {phase: seconds[phase] / steps for phase in PHASES}


# ------------------------------------------------------------------------------ the two sides
def run_automodel(args: argparse.Namespace, levers: list[str]) -> dict:
    from automodel.recipes.vlm.finetune import FinetuneRecipeForVLM
    from automodel.training.signals import StopOnSignal

    out = tempfile.mkdtemp(prefix="bench_automodel_")
    cfg = {
        "model": {
            "_target_": "automodel.models.AutoModelForImageTextToText.from_pretrained",
            "pretrained_model_name_or_path": args.model,
        },
        "dataset": {
            "_target_": "automodel.datasets.vlm.make_conversation_dataset",
            "path_or_dataset": args.data,
        },
        "dataloader": {"num_workers": args.workers},
        "step_scheduler": {
            "global_batch_size": args.global_batch,
            "local_batch_size": args.local_batch,
            "max_steps": args.warmup + args.steps,
            "log_every_steps": 10_000,
        },
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": args.lr, "weight_decay": 0.0},
        "lr_scheduler": {"lr_warmup_steps": 0, "lr_decay_style": "linear", "min_lr": 0.0},
        "freeze_config": {"freeze_vision_tower": True},
        "precision": {"autocast": "none", "fp32_attention_on_cpu": False},
        "checkpoint": {"enabled": False, "checkpoint_dir": out},
        "distributed": {"activation_checkpointing": args.checkpointing},
    }
    if args.bf16:  # fp32 weights and optimizer states, bf16 matrix products
        cfg["precision"]["autocast"] = "bf16"
    if args.bf16_weights:
        cfg["model"]["torch_dtype"] = "bfloat16"
    if args.lora:
        cfg["peft"] = dict(LORA)
    for lever in levers:
        for section, values in LEVERS[lever].items():
            cfg.setdefault(section, {}).update(values)
    recipe = FinetuneRecipeForVLM(cfg)
    recipe.setup()
    clock = None if "compile" in levers else PhaseClock(recipe.device.type == "cuda")
    if clock is not None:  # hooks would break the compiled graphs
        clock.attach(recipe.model)
        clock.on_call(recipe, "forward_loss", "forward")
    total = recipe.max_steps
    with StopOnSignal() as stop:
        recipe.max_steps = args.warmup
        recipe.train_steps(stop)
        if clock is not None:
            clock.reset()
        start, waited = time.perf_counter(), recipe.data_wait.total
        recipe.max_steps = total
        recipe.train_steps(stop)
        seconds = time.perf_counter() - start
        waited = recipe.data_wait.total - waited
    profile = None
    if clock is not None:
        clock.seconds["data"] = waited
        profile = clock.per_step(args.steps)
    cache = getattr(recipe, "vision_cache", None)
    return {
        "seconds": seconds,
        "profile": profile,
        "loss": last_logged_loss(Path(out)),
        "tower_calls": None if cache is None else cache.computed,
        "data_wait_pct": 100 * waited / seconds,
        "pipeline_samples_per_s": pipeline_rate(recipe.train_loader),
        "recompute": recomputes(recipe.model),
        "optimizer": optimizer_kind(recipe.optimizer),
        "trainable": sum(p.numel() for p in recipe.model.parameters() if p.requires_grad),
    }


def recomputes(model) -> bool:
    """Whether any module of ``model`` recomputes its activations in backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def optimizer_kind(optimizer) -> str:
    """The optimizer's class, ``+fused`` when one kernel updates each parameter."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    fused = optimizer.defaults.get("fused") or False
    return type(optimizer).__name__ + ("+fused" if fused else "")


def pipeline_rate(loader, epochs: int = 2) -> float:
    """Samples per second the data loader delivers with no training to wait for.

    The same loader (workers, collate, image processing) after the timed steps; the clock starts
    at the first batch, so worker start-up is not counted.
    """
    start, samples = None, 0
    for _ in range(epochs):
        for batch in loader:
            if start is None:
                start = time.perf_counter()
            elif batch is not None:
                samples += len(batch["input_ids"])
    return samples / (time.perf_counter() - start)


def last_logged_loss(out_dir: Path) -> float | None:
    path = out_dir / "training.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = [line["loss"] for line in lines if "loss" in line]
    return losses[-1] if losses else None


def trl_dataset(data: str):
    """The JSONL as TRL's VLM format: image placeholders in ``messages``, PIL images in ``images``."""
    import datasets
    from PIL import Image

    base = Path(data).parent
    rows = []
    for line in Path(data).read_text().splitlines():
        record = json.loads(line)
        images = []
        for message in record["messages"]:
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(Image.open(base / part.pop("image")).convert("RGB"))
        rows.append({"messages": record["messages"], "images": images})
    return datasets.Dataset.from_list(rows)


def label_counts(args: argparse.Namespace, trainer) -> dict:
    """Label tokens of the first batch under TRL's collator and automodel's, same samples."""
    from automodel.datasets.collate import default_collate_fn
    from automodel.datasets.vlm import make_conversation_dataset

    n = args.local_batch
    samples = [dict(trainer.train_dataset[i]) for i in range(n)]
    theirs = trainer.data_collator(samples)
    ours_ds = make_conversation_dataset(args.data)
    ours = default_collate_fn([ours_ds[i] for i in range(n)], processor=trainer.processing_class)
    return {
        "trl_labels": int((theirs["labels"] != -100).sum()),
        "automodel_labels": int((ours["labels"] != -100).sum()),
        "same_input_ids": bool(
            theirs["input_ids"].shape == ours["input_ids"].shape
            and (theirs["input_ids"] == ours["input_ids"]).all()
        ),
    }


def run_trl(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(42)
    processor = AutoProcessor.from_pretrained(args.model)
    processor.chat_template = same_labels_template()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.bf16_weights else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    for p in model.model.vision_tower.parameters():  # the same frozen tower as automodel's
        p.requires_grad_(False)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
        )
    marks = {}
    clock = PhaseClock(cuda)

    class Clock(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step in (args.warmup, args.warmup + args.steps):
                marks[state.global_step] = clock.now()
            if state.global_step == args.warmup:
                clock.reset()
            if state.global_step == args.warmup + args.steps:
                marks["profile"] = clock.per_step(args.steps)

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        per_device_train_batch_size=args.local_batch,
        gradient_accumulation_steps=args.global_batch // args.local_batch,
        max_steps=args.warmup + args.steps,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch_fused",  # SFTConfig's default with torch >= 2.8; automodel's too
        max_grad_norm=1.0,
        gradient_checkpointing=args.checkpointing,
        assistant_only_loss=True,
        max_length=None,
        logging_steps=10_000,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=args.workers,
        use_cpu=not cuda,
        bf16=args.bf16,
        fp16=False,
        seed=42,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=trl_dataset(args.data),
        processing_class=processor,
        callbacks=[Clock()],
        peft_config=peft_config,
    )
    counts = label_counts(args, trainer)
    clock.attach(trainer.model)
    clock.on_call(trainer, "compute_loss", "forward")
    clock.on_call(trainer, "get_batch_samples", "data")
    result = trainer.train()
    seconds = marks[args.warmup + args.steps] - marks[args.warmup]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "seconds": seconds,
        "profile": marks["profile"],
        "loss": result.training_loss,
        "trainable": trainable,
        "recompute": recomputes(trainer.model),
        "optimizer": optimizer_kind(trainer.optimizer),
        **counts,
    }


def same_labels_template() -> str:
    """TRL's training copy of Gemma 3's hub template (which ``assistant_only_loss`` swaps in),
    with the newline after each ``<end_of_turn>`` moved out of its ``{% generation %}`` block.

    TRL's copy labels that newline too, a token generation never writes (it stops at
    ``<end_of_turn>``); automodel labels each reply and its ``<end_of_turn>``. Moved out, both
    sides learn the same tokens (the run checks the label counts).
    """
    import trl

    path = Path(trl.__file__).parent / "chat_templates" / "gemma3_training.jinja"
    training = path.read_text()
    newline_inside = "{{ '<end_of_turn>\n' }}\n        {%- endgeneration -%}"
    newline_outside = "{{ '<end_of_turn>' }}\n        {%- endgeneration -%}\n        {{ '\n' }}"
    if newline_inside not in training:
        raise SystemExit(f"{path} changed: its reply block no longer ends as expected")
    return training.replace(newline_inside, newline_outside)


def child(args: argparse.Namespace) -> None:
    if args.side == "trl":
        result = run_trl(args)
    else:
        result = run_automodel(args, [lever for lever in args.levers.split(",") if lever])
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import torch

    if args.device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
        result["device_name"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ the parent
def launch(
    args: argparse.Namespace,
    side: str,
    model: Path,
    levers: list[str],
    lora: bool,
    checkpointing: bool | None = None,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--model",
        str(model),
        "--data",
        str(args.data),
        "--levers",
        ",".join(levers),
    ]
    for flag in ("bf16", "bf16_weights"):
        if getattr(args, flag):
            cmd.append(f"--{flag.replace('_', '-')}")
    if lora:
        cmd.append("--lora")
    if args.checkpointing if checkpointing is None else checkpointing:
        cmd.append("--checkpointing")
    for key in ("steps", "warmup", "global_batch", "local_batch", "workers", "lr", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT ") :])
    shown = {
        k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if k != "profile"
    }
    print(
        f"  {side} {model.name} levers={','.join(levers) or '-'}"
        f"{' checkpointing' if '--checkpointing' in cmd else ''}: {shown}",
        flush=True,
    )
    return result


def memory_key(run: dict) -> str:
    """The peak-memory figure of a run: CUDA memory on a GPU, else the process's RSS."""
    return "peak_gpu_gb" if "peak_gpu_gb" in run else "peak_rss_gb"


def summarize(runs: list[dict], samples: int, tokens_per: float) -> dict:
    sps = statistics.median(samples / r["seconds"] for r in runs)
    memory = memory_key(runs[0])
    return {
        "samples_per_s": sps,
        "tokens_per_s": sps * tokens_per,
        "peak_gb": statistics.median(r[memory] for r in runs),
        "loss": runs[-1].get("loss"),
        "runs": len(runs),
    }


def paired_ratios(runs: dict) -> dict:
    """automodel / TRL of each round's adjacent pair of runs (speed and peak memory).

    Each round's two runs follow one another, so a drift in the machine's speed over the
    benchmark (frequency, other load) moves both; the median of these ratios is the headline.
    """
    memory = memory_key(runs["TRL"][0])
    pairs = list(zip(runs["automodel"], runs["TRL"]))
    return {
        "speed": [trl["seconds"] / ours["seconds"] for ours, trl in pairs],
        "memory": [ours[memory] / trl[memory] for ours, trl in pairs],
    }


def sample_flops(sizes: dict, vocab: int, counts: list[float], lora: bool) -> float:
    """The model FLOPs one sample's training needs (``benchmarks/shapes.py``: ``train_flops``
    for the decoder, the tower's forward for its image), the same for both sides."""
    tokens, labels = (round(c) for c in counts[:2])
    rank = LORA["r"] if lora else None
    return train_flops(sizes, tokens, labels, rank, vocab) + tower_flops(sizes)


def print_mfu(args, rows: dict, config: str, runs: dict, per_sample: float) -> None:
    name = runs["automodel"][0]["device_name"]
    peak = args.peak_tflops or peak_tflops(name)
    trainable = {side: side_runs[0]["trainable"] for side, side_runs in runs.items()}
    print(f"device {name}; trainable parameters {trainable}", flush=True)
    if peak is None:
        print("MFU: unknown peak for this device; pass --peak-tflops", flush=True)
        return
    for side in runs:
        value = rows[(config, side)]["samples_per_s"] * per_sample / (peak * 1e12)
        rows[(config, side)]["mfu"] = value
        print(f"MFU {side}: {100 * value:.1f}% of {peak:.0f} TFLOP/s", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        default="lora,full",
        help="the headline twin's rows (lora, full; the default) or the earlier twin's (a, b)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, one round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="passes over the data (headline)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (a, b: 12)")
    # a, b: two, as torch.compile compiles the decoder blocks on the first step and recompiles
    # once for dynamic shapes on the second; the headline runs without compile: one.
    parser.add_argument("--warmup", type=int, help="untimed steps before the clock (1; a, b: 2)")
    parser.add_argument("--global-batch", type=int, help="(2; a, b: 8)")
    parser.add_argument("--local-batch", type=int, help="(2; a, b: 8)")
    parser.add_argument("--samples", type=int, help="conversations in the data (8; a, b: 32)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers, both sides")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS, both sides")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-lever-rows", action="store_true", help="skip the per-lever rows")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--gpu", action="store_true", help="CUDA, Gemma 3 4B's shape in bf16, LoRA (config b)"
    )
    parser.add_argument(
        "--image-tokens",
        type=int,
        help="a, b: tokens per image (a square; Gemma 3 has 256), instead of the twin's 16",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", action="store_true", help="both sides autocast to bf16 (the headline's setting)"
    )
    precision.add_argument(
        "--fp32",
        action="store_true",
        help="fp32 matrix products (a, b's setting; not the headline)",
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (CUDA)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "automodel_vs_trl"))
    # TRL's SFTConfig recomputes activations by default (gradient_checkpointing=True); the
    # benchmark sets the same on both sides: off unless asked.
    parser.add_argument(
        "--checkpointing", action="store_true", help="both sides recompute activations"
    )
    # Internal: one side in this process.
    parser.add_argument("--child", choices=("automodel", "trl"), dest="side")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--levers", default="")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--bf16-weights", action="store_true")
    return parser.parse_args()


def setting(args: argparse.Namespace) -> tuple[list[str], dict, str, tuple[int, int]]:
    """Fills in ``args``' defaults for the chosen configurations.

    Returns:
        The configurations, the twin's sizes, the twin's folder prefix and the answers' length
        range in words.
    """
    configs = [c for c in args.configs.split(",") if c]
    if args.quick:
        configs = ["a"]
    unknown = [c for c in configs if c not in CONFIGS]
    headline = [c for c in configs if c in HEADLINE]
    if headline and args.image_tokens:
        sys.stderr.write("error: --image-tokens: the headline twin has 256; it applies to a, b\n")
        sys.exit(2)
    if unknown or not configs or (headline and len(headline) != len(configs)):
        sys.stderr.write(
            f"error: --configs {args.configs}: choose among lora,full (the headline twin) or "
            "among a,b (the earlier twin)\n"
        )
        sys.exit(2)
    if args.gpu:
        configs, args.device, args.bf16, args.bf16_weights = ["b"], "cuda", True, True
        args.no_lever_rows, args.rounds = True, 1
        args.warmup, args.steps, args.global_batch, args.local_batch = 2, 10, 4, 4
    if headline:
        # 3 epochs of 8 conversations in steps of 2: 12 steps, the first one untimed.
        sizes, twin, words = HEADLINE_TWIN, "headline", (90, 110)
        args.bf16 = not args.fp32
        args.samples = args.samples or 8
        args.global_batch = args.global_batch or 2
        args.local_batch = args.local_batch or args.global_batch
        args.warmup = 1 if args.warmup is None else args.warmup
        total = args.epochs * args.samples // args.global_batch
        args.steps = args.steps or total - args.warmup
    else:
        sizes, twin, words = SIZES, "gemma3", (3, 90)
        if args.gpu:
            sizes = GPU_SIZES
        if args.quick:
            sizes, args.rounds, args.steps, args.warmup = QUICK_SIZES, 1, 2, 1
            args.samples, args.no_lever_rows = 8, True
        if args.image_tokens:
            sizes = with_image_tokens(sizes, args.image_tokens)
            twin = f"gemma3_img{args.image_tokens}"
        # 12 steps of global batch 8 are 3 epochs of the 32 conversations: a fine-tune's usual
        # repeated passes, where the frozen tower's cache can act (one pass would hide it).
        args.samples, args.steps = args.samples or 32, args.steps or 12
        args.global_batch = args.global_batch or 8
        args.local_batch = args.local_batch or args.global_batch
        args.warmup = 2 if args.warmup is None else args.warmup
    if args.steps < 1:
        sys.stderr.write(f"error: no timed steps: {args.warmup} warm-up of {args.steps}\n")
        sys.exit(2)
    return configs, sizes, twin, words


def check_device(args: argparse.Namespace, headline: bool) -> None:
    """Stops, in one line, where the chosen precision or device cannot run here."""
    import torch

    from automodel.models.forward import cpu_has_fast_matmul

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("error: --device cuda: no CUDA device here\n")
        sys.exit(2)
    if args.device == "cpu" and args.bf16 and not cpu_has_fast_matmul(torch.bfloat16):
        # Both sides would crawl: automodel refuses such a run, TRL's autocast would run it.
        hint = (
            "run the headline on a GPU (--device cuda) or a CPU with AMX; --fp32 runs the same "
            "twin with fp32 matrix products, a different setting"
            if headline
            else "drop --bf16"
        )
        sys.stderr.write(
            "error: bf16: this CPU has no native bf16 matrix products (torch's oneDNN kernels "
            "need AVX512 or AMX); its fallback runs them many times slower than fp32 on both "
            f"sides; {hint}\n"
        )
        sys.exit(2)


def print_profile(config: str, runs: dict, steps: int) -> None:
    """Seconds per timed step of each phase, the median over rounds, for both sides."""
    print(
        f"({config}) seconds per step: " + " ".join(f"{p:>9}" for p in (*PHASES, "other", "step"))
    )
    for side, side_runs in runs.items():
        profiles = [r["profile"] for r in side_runs if r.get("profile")]
        if not profiles:
            print(f"  {side:<20} no profile (compiled)")
            continue
        phase = {p: statistics.median(pr[p] for pr in profiles) for p in PHASES}
        step = statistics.median(r["seconds"] for r in side_runs) / steps
        cells = [*phase.values(), step - sum(phase.values()), step]
        print(f"  {side:<20}" + "".join(f"{v:>10.3f}" for v in cells), flush=True)


def report(rows: dict, paired: dict, configs: list[str], label_check: dict) -> None:
    """The table of every row, each round's ratios, the targets (headline) and the last line."""
    print()
    print(
        f"{'config':<8}{'side':<28}{'samples/s':>10}{'tokens/s':>10}{'peak GB':>9}{'x TRL':>7}{'mem x TRL':>10}"
    )
    for (config, side), row in rows.items():
        trl = rows[(config, "TRL")]
        name = f"({config}) V={CONFIGS[config]}"
        print(
            f"{name:<16}{side:<20}{row['samples_per_s']:>10.2f}"
            f"{row['tokens_per_s']:>10.0f}{row['peak_gb']:>9.2f}"
            f"{row['samples_per_s'] / trl['samples_per_s']:>7.2f}{row['peak_gb'] / trl['peak_gb']:>10.2f}"
        )
    for config, ratios in paired.items():
        shown = {k: [round(x, 2) for x in v] for k, v in ratios.items()}
        print(f"({config}) automodel / TRL in each round: {shown}")
    if configs[0] in HEADLINE:
        for config in configs:
            speed = statistics.median(paired[config]["speed"])
            memory = statistics.median(paired[config]["memory"])
            met = speed >= 2.0 and memory <= 0.5
            print(
                f"({config}) speedup={speed:.2f} memory_ratio={memory:.2f}: targets speedup >= 2.0 "
                f"and memory_ratio <= 0.5 {'met' if met else 'missed'}"
            )
        speed_config = memory_config = "lora" if "lora" in configs else configs[0]
    else:
        speed_config = "a" if "a" in configs else configs[0]
        memory_config = "b" if "b" in configs else configs[-1]
    speedup = statistics.median(paired[speed_config]["speed"])
    memory_ratio = statistics.median(paired[memory_config]["memory"])
    print(
        f"speedup=({speed_config}) memory_ratio=({memory_config}), medians of the rounds' "
        f"ratios; label tokens {label_check}"
    )
    print(f"speedup={speedup:.2f} memory_ratio={memory_ratio:.2f}")


def main() -> None:
    args = parse_args()
    if args.side:
        child(args)
        return
    configs, sizes, twin, words = setting(args)
    headline = configs[0] in HEADLINE
    check_device(args, headline)
    work = Path(args.work) / ("quick" if args.quick else twin)
    args.data = make_data(work / f"data{args.samples}", args.samples, sizes["image_size"], words)
    all_levers = [
        x
        for x in LEVERS
        # compile is left out of --quick (a smoke run), --gpu (a lent GPU's minutes) and the
        # headline (its 12 steps would not pay back the compilation)
        if not (x == "compile" and (args.quick or args.gpu or headline))
        and not (x == "fp32_attention" and not args.bf16)
    ]
    samples = args.steps * args.global_batch
    print(
        f"{'headline twin (Gemma 3 4B / 8)' if headline else 'twin'}: "
        f"global batch {args.global_batch} (local {args.local_batch}), {args.steps} timed steps "
        f"after {args.warmup} warm-up, {args.rounds} rounds, OMP_NUM_THREADS={args.threads}, "
        f"{args.workers} DataLoader worker(s), {sizes['mm_tokens_per_image']} tokens per image, "
        f"answers of {words[0]}-{words[1]} words, activation recomputation on both sides: "
        f"{'on' if args.checkpointing else 'off'}, matrix products in "
        f"{'bf16 (autocast)' if args.bf16 else 'fp32'}, on {args.device}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    if headline and not args.bf16:
        print("not the headline setting (both sides autocast to bf16): fp32 matrix products")
    rows, label_check, paired = {}, None, {}
    for config in configs:
        model = make_model(work / f"{twin}_vocab{CONFIGS[config]}", CONFIGS[config], sizes)
        counts = [statistics.mean(c) for c in zip(*sample_counts(model, args.data))]
        per = counts[0]
        lora = config == "lora" or args.gpu
        runs = {"automodel": [], "TRL": []}
        for _ in range(args.rounds):
            runs["automodel"].append(launch(args, "automodel", model, all_levers, lora))
            runs["TRL"].append(launch(args, "trl", model, [], lora))
        label_check = {
            k: runs["TRL"][0][k] for k in ("trl_labels", "automodel_labels", "same_input_ids")
        }
        for side, side_runs in runs.items():
            rows[(config, side)] = summarize(side_runs, samples, per)
        paired[config] = paired_ratios(runs)
        print_profile(config, runs, args.steps)
        if args.device == "cuda":
            flops = sample_flops(sizes, CONFIGS[config], counts, lora)
            print_mfu(args, rows, config, runs, flops)
        if config == "b" and not args.no_lever_rows:
            for lever in all_levers:
                rest = [x for x in all_levers if x != lever]
                rows[(config, f"automodel -{lever}")] = summarize(
                    [launch(args, "automodel", model, rest, lora)], samples, per
                )
        if config == "a" and not args.no_lever_rows and not args.checkpointing:
            # TRL as it comes: SFTConfig recomputes activations unless told not to.
            rows[(config, "TRL, its default recompute")] = summarize(
                [launch(args, "trl", model, [], lora, checkpointing=True)], samples, per
            )
        ours = runs["automodel"]
        print(
            f"({config}) data pipeline (automodel, {args.workers} worker(s)): "
            f"{statistics.median(r['pipeline_samples_per_s'] for r in ours):.1f} samples/s alone "
            f"against {rows[(config, 'automodel')]['samples_per_s']:.1f} trained; the timed steps "
            f"waited for data {statistics.median(r['data_wait_pct'] for r in ours):.1f}% of the time",
            flush=True,
        )
        print(f"config ({config}) done; first batch label tokens: {label_check}", flush=True)

    report(rows, paired, configs, label_check)


if __name__ == "__main__":
    main()
