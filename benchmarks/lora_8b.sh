#!/usr/bin/env bash
# LoRA DPO + tr_soft + FlipGuard on a Llama-3-8B-shaped model (32 layers, random init, bf16) on ONE GPU, ZeRO-3,
# no offload: the base is frozen (no optimizer state for it), the reference is the base plus the moved reference
# adapter and the anchor the base with adapters off, so one copy of the 8B weights is held. Prints step time
# and peak GPU memory beside aligner-estimate's prediction (benchmarks/scale_8b.py does both).
#
#   bash benchmarks/lora_8b.sh            # from the repository root, on a machine with one GPU (H100/H200)
#
# Same requirements as benchmarks/scale_8b.sh (torch with CUDA, transformers, deepspeed, peft importable by
# $PYTHON). LORA_R (16), STEPS (4). Writes $WORK/lora_8b.md and appends it to benchmarks/RESULTS.md when WRITE=1.
set -euo pipefail

source "$(dirname "$0")/gpu_env.sh"
WORK=${WORK:-/tmp/aligner-lora-8b}
STEPS=${STEPS:-4}
LORA_R=${LORA_R:-16}
CONFIG=configs/llama3-8b-zero3.yaml
PLUGINS=dpo,tr_soft,flipguard
mkdir -p "$WORK"

# 1 GPU, micro-batch 1 x 2048 tokens, chunked head, packing, the static cache off (the anchor is the policy
# engine with adapters off), tr_soft every 2 steps so the reference adapter moves during the run.
SETS=(train.micro_batch_size=1 train.grad_accum=1 "train.max_steps=$STEPS" train.lr=1e-4 train.lr_schedule=constant
      train.warmup_steps=0 train.save_every=0 data.eval=null "data.train=$WORK/pairs.jsonl" "output_dir=$WORK/run"
      "model.lora.r=$LORA_R" "model.lora.alpha=$((2 * LORA_R))" train.packing=true train.logps_chunk_tokens=1024
      train.cache_static_logps=false tr_soft.every=2)

"$PYTHON" benchmarks/scale_8b.py write-data "$WORK/pairs.jsonl" --pairs $((STEPS * 2)) --tokens 2048
MODEL="$WORK/model-32"
[ -f "$MODEL/config.json" ] || "$PYTHON" benchmarks/scale_8b.py write-model "$MODEL" --layers 32
echo "== estimate: 32 layers, LoRA r=$LORA_R, 1 GPU ($PLUGINS)"
"$PYTHON" benchmarks/scale_8b.py estimate --config "$CONFIG" --plugins "$PLUGINS" --layers 32 --gpus 1 \
    --set "${SETS[@]}" "model.name_or_path=$MODEL"
rm -rf "$WORK/run"
echo "== training 32 layers, LoRA r=$LORA_R, $STEPS steps, --plugins $PLUGINS"
train_once "$WORK/train.log" --config "$CONFIG" --plugins "$PLUGINS,rss_probe:probe" --set "${SETS[@]}" \
    "model.name_or_path=$MODEL"
"$PYTHON" benchmarks/scale_8b.py summarize "$WORK/run" --config "$CONFIG" --plugins "$PLUGINS" --layers 32 \
    --set "${SETS[@]}" "model.name_or_path=$MODEL" | tee "$WORK/lora_8b.md"
if [ "${WRITE:-0}" = 1 ]; then
    { echo; echo "### LoRA 8B on one GPU ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"; echo;
      cat "$WORK/lora_8b.md"; echo; echo "Command: \`bash benchmarks/lora_8b.sh\`"; } >> benchmarks/RESULTS.md
fi
