#!/bin/bash
# FSDP2 with NCCL and bf16 on this machine's GPUs, through the CLI, in two parts (~10 minutes):
#   1. the tiny Gemma 3 twin on the synthetic receipts, full fine-tuning, 30 steps;
#   2. a randomly initialised model shaped like Gemma 3 4B (262k vocabulary, 34 layers, SigLIP
#      27 layers at 896 px) with LoRA and activation checkpointing, 10 steps.
# Each prints its step lines (loss, tokens/s, peak memory) and the exit status.
# With one GPU the processes cannot share it under NCCL: the run is single-process (bf16 autocast).
#   scripts/gpu_fsdp2_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/automodel-gpu-check}
PY="$(scripts/env.sh)/bin/python"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 AUTOMODEL_CACHE="$OUT/cache"
FSDP=(--nproc-per-node "$NGPU" --distributed.strategy fsdp2
      --distributed.param_dtype bfloat16 --distributed.reduce_dtype float32)
echo "GPUs: $NGPU"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

echo "== tiny twin, full fine-tuning"
"$PY" -m automodel finetune vlm -c examples/vlm/quickstart.yaml "${FSDP[@]}" \
  --step_scheduler.max_steps 30 --step_scheduler.log_every_steps 5 \
  --step_scheduler.eval_every_steps null --checkpoint.checkpoint_dir "$OUT/tiny" \
  2>&1 | grep -E "^step|data parallel|saved|Error|error"
echo "exit: ${PIPESTATUS[0]}"

echo "== Gemma-3-4B-shaped random model, LoRA"
"$PY" - "$OUT/gemma3-4b-shape" <<'EOF'
import sys
import time

from automodel.twins import make_tiny

start = time.perf_counter()
make_tiny(
    "gemma3", sys.argv[1], seed=0, reuse=True,
    vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=1024,
    vision_hidden_size=1152, vision_intermediate_size=4304, vision_num_hidden_layers=27,
    vision_num_attention_heads=16, image_size=896, patch_size=14, mm_tokens_per_image=256,
)
print(f"built in {time.perf_counter() - start:.0f} s")
EOF
"$PY" -m automodel finetune vlm -c examples/vlm/quickstart.yaml "${FSDP[@]}" \
  --model.pretrained_model_name_or_path "$OUT/gemma3-4b-shape" --model.torch_dtype torch.bfloat16 \
  --peft.dim 16 --distributed.activation_checkpointing true \
  --step_scheduler.global_batch_size $((4 * NGPU)) --step_scheduler.local_batch_size 2 \
  --step_scheduler.max_steps 10 --step_scheduler.log_every_steps 1 \
  --step_scheduler.val_every_steps null --step_scheduler.eval_every_steps null \
  --checkpoint.enabled false --checkpoint.checkpoint_dir "$OUT/g4b" \
  --dataloader.collate_fn.max_length 1024 --preview.num_samples 0 \
  2>&1 | grep -E "^step|data parallel|parameters|saved|Error|error"
echo "exit: ${PIPESTATUS[0]}"
