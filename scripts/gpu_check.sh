#!/bin/bash
# Everything a lent GPU should measure, in one command that ends within 8 minutes
# (docs/performance.md, "One GPU command"):
#   1. real_shape: benchmarks/real_shape.py --device cuda on Gemma 3 4B's shape: a random bf16
#      model drawn on the GPU, LoRA r16 with activation checkpointing, 3 steps, an exact resume,
#      merge-lora and generate; each phase's wall time, each step's seconds, tokens/s and MFU,
#      peak CUDA memory;
#   2. vs_trl: benchmarks/vs_trl.py --configs lora --device cuda --rounds 1: automodel against
#      TRL's SFTTrainer on the headline twin with LoRA (speedup, memory ratio);
#   3. with more than one GPU, FSDP2 over NCCL through the CLI on every GPU: fsdp2_lora, part 1's
#      model and data with LoRA; fsdp2_full, a tiny twin fully fine-tuned (bf16 parameters,
#      fp32 gradient reduction).
# Each part runs under `timeout`, within what is left of the budget; a summary at the end gives
# each part's exit status, wall seconds and key figures (lines starting "gpu_check: "). Output
# goes to stdout and ${OUT:-/tmp}/gpu_check.log (each part's own log beside it); the models and
# data go to $GPU_CHECK_WORK (/tmp/gpu_check_work), never under $OUT.
#
#   scripts/gpu_check.sh --download   # where pip works: the wheels a bare CUDA image lacks, into
#                                     # .whl/ (ignored by git); copy the clone with .whl/ over
#   scripts/gpu_check.sh              # on the GPU machine: installs .whl/*.whl into /tmp/site
#   scripts/gpu_check.sh --smoke      # the same parts on this CPU at tiny sizes (a few minutes):
#                                     # real_shape --smoke, vs_trl --quick, FSDP2 on 2 gloo ranks
# Python: $PY when set; else python3 with .whl/ installed, or python3 where nvidia-smi exists and
# trl imports; else the project's environment (scripts/env.sh).
# GPU_CHECK_SECONDS sets the budget (default 480; --smoke: 900, a slow CPU's margin).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  --download)
    # Packages the parts need beyond a CUDA PyTorch image, pinned as in the lock. The image's
    # huggingface_hub (1.x) and tokenizers stay: transformers accepts them, and hub 2.x would
    # need httpx2, which the image lacks.
    PINS=(trl transformers peft datasets torchdata dill multiprocess)
    specs=()
    for name in "${PINS[@]}"; do
      specs+=("$(grep -i -E "^${name}==" requirements-lock.txt)")
    done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
    ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: scripts/gpu_check.sh [--smoke | --download]" >&2; exit 2 ;;
esac

BUDGET=${GPU_CHECK_SECONDS:-$([ "$MODE" = gpu ] && echo 480 || echo 900)}
START=${EPOCHREALTIME/./}  # microseconds
LOGS=${OUT:-/tmp}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
mkdir -p "$LOGS" "$WORK"
LOG="$LOGS/gpu_check.log"
exec > >(tee "$LOG") 2>&1

if [ -n "${PY:-}" ]; then
  :
elif [ "$MODE" = gpu ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
  PY=python3
elif [ "$MODE" = gpu ] && command -v nvidia-smi >/dev/null \
    && python3 -c "import trl, torchdata" 2>/dev/null; then
  PY=python3
else
  PY="$(scripts/env.sh)/bin/python"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 AUTOMODEL_CACHE="$WORK/cache"

if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  [ "$NGPU" -ge 1 ] 2>/dev/null || { echo "gpu_check: no CUDA device (try --smoke)"; exit 1; }
  # Seconds each part may take at most (the budget's end comes first if it is nearer).
  if [ "$NGPU" -gt 1 ]; then CAPS=(real_shape=240 vs_trl=120 fsdp2_lora=60 fsdp2_full=40)
  else CAPS=(real_shape=280 vs_trl=180); fi
else
  NGPU=0
  CAPS=(real_shape=300 vs_trl=300 fsdp2_lora=180 fsdp2_full=180)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 ranks share the cores
fi
"$PY" -c "import sys, torch, transformers; print(f'python {sys.version.split()[0]}, torch \
{torch.__version__}, transformers {transformers.__version__}, GPUs {torch.cuda.device_count()}')"
echo "gpu_check: mode $MODE, budget $BUDGET s, logs in $LOGS, work in $WORK"

SUMMARY=()
FAILED=0

now() { echo "${EPOCHREALTIME/./}"; }
seconds_since() { local us=$(($(now) - $1)); printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000)); }

cap() {  # cap NAME: this part's seconds from CAPS
  local entry
  for entry in "${CAPS[@]}"; do
    [ "${entry%%=*}" = "$1" ] && { echo "${entry#*=}"; return; }
  done
  echo 0
}

# part NAME FIGURES_FUNCTION COMMAND...: runs COMMAND under timeout, logs to $LOGS/gpu_check_NAME.log
# and adds the summary line.
part() {
  local name=$1 figures=$2
  shift 2
  local left limit begin status seconds
  # 15 s kept back: timeout's --kill-after and the summary.
  left=$((BUDGET - ($(now) - START) / 1000000 - 15))
  limit=$(cap "$name")
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    SUMMARY+=("gpu_check: $name skipped: ${left} s left of the $BUDGET s budget")
    return
  fi
  echo "== $name (at most $limit s): $*"
  begin=$(now)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/gpu_check_$name.log"
  status=${PIPESTATUS[0]}
  seconds=$(seconds_since "$begin")
  [ "$status" -eq 0 ] || FAILED=1
  [ "$status" -eq 124 ] || [ "$status" -eq 137 ] && status="$status (timed out after $limit s)"
  SUMMARY+=("gpu_check: $name exit=$status seconds=$seconds | $("$figures" "$LOGS/gpu_check_$name.log")")
}

or_none() { local text; text=$(cat); echo "${text:-no figures (see the log)}"; }

real_shape_figures() {
  { grep -E '^real_shape: model=' "$1" | tail -1 | sed 's/^real_shape: //'
    grep -E '^real_shape: peak_gb=' "$1" | tail -1 | sed 's/^real_shape: //'
  } | paste -sd ' ' | or_none
}

vs_trl_figures() {
  { grep -E '^speedup=[0-9]' "$1" | tail -1
    grep -E '^MFU automodel' "$1" | tail -1 | sed -E 's/^MFU automodel: ([0-9.]+%).*/mfu_automodel=\1/'
  } | paste -sd ' ' | or_none
}

fsdp2_figures() {  # the last step line's throughput and memory
  grep -E '^step [0-9]+/[0-9]+ ' "$1" | tail -1 \
    | sed -E 's/^step ([0-9]+\/[0-9]+) .*loss ([0-9.]+).*tokens\/s ([0-9.]+).* mem ([0-9.]+)GB.*/step=\1 loss=\2 tokens_per_s=\3 peak_gb=\4/' \
    | or_none
}

# ---------------------------------------------------------------------------------------- 1
RS="$WORK/real_shape"
if [ "$MODE" = gpu ]; then
  part real_shape real_shape_figures "$PY" benchmarks/real_shape.py --model gemma3 --device cuda \
    --steps 3 --out "$RS" --cache "$WORK/models"
else
  part real_shape real_shape_figures "$PY" benchmarks/real_shape.py --model gemma3 --smoke \
    --device cpu --steps 2 --out "$RS" --cache "$WORK/models"
fi

# ---------------------------------------------------------------------------------------- 2
if [ "$MODE" = gpu ]; then
  part vs_trl vs_trl_figures "$PY" benchmarks/vs_trl.py --configs lora --device cuda --rounds 1 \
    --work "$WORK/vs_trl"
else
  part vs_trl vs_trl_figures "$PY" benchmarks/vs_trl.py --quick --work "$WORK/vs_trl"
fi

# ---------------------------------------------------------------------------------------- 3
if [ "$MODE" = gpu ] && [ "$NGPU" -lt 2 ]; then
  SUMMARY+=("gpu_check: fsdp2 skipped: one GPU (NCCL FSDP2 needs at least two)")
else
  NPROC=$([ "$MODE" = gpu ] && echo "$NGPU" || echo 2)
  FSDP=(--nproc-per-node "$NPROC" --distributed.strategy fsdp2 --checkpoint.enabled false
        --step_scheduler.global_batch_size $((2 * NPROC)) --step_scheduler.local_batch_size 2
        --step_scheduler.log_every_steps 1 --preview.num_samples 0)
  if [ -f "$RS/gemma3/config.yaml" ]; then
    part fsdp2_lora fsdp2_figures "$PY" -m automodel finetune vlm -c "$RS/gemma3/config.yaml" \
      "${FSDP[@]}" --step_scheduler.max_steps 3 --checkpoint.checkpoint_dir "$WORK/fsdp2_lora"
  else
    SUMMARY+=("gpu_check: fsdp2_lora skipped: real_shape wrote no config ($RS/gemma3/config.yaml)")
  fi
  if [ -f "$RS/gemma3/config.yaml" ]; then
    # A tiny twin (built first, within the part's time) in fp32, every weight trained: FSDP2
    # shards the weights and the optimizer state.
    part fsdp2_full fsdp2_figures bash -c \
      '"$1" -m automodel models make-tiny gemma3 "$2" >/dev/null && exec "$1" -m automodel "${@:3}"' \
      make-tiny-then "$PY" "$WORK/tiny-gemma3" finetune vlm -c "$RS/gemma3/config.yaml" \
      "${FSDP[@]}" '~peft' --model.pretrained_model_name_or_path "$WORK/tiny-gemma3" \
      --model.torch_dtype float32 --distributed.param_dtype bfloat16 \
      --distributed.reduce_dtype float32 --step_scheduler.max_steps 5 \
      --checkpoint.checkpoint_dir "$WORK/fsdp2_full"
  else
    SUMMARY+=("gpu_check: fsdp2_full skipped: real_shape wrote no config ($RS/gemma3/config.yaml)")
  fi
fi

echo
echo "gpu_check: summary ($MODE, $NGPU GPU(s), $(seconds_since "$START") s of the $BUDGET s budget)"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
