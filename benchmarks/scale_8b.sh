#!/usr/bin/env bash
# A Llama-3-8B-shaped model (32 layers, random init, bf16) trained for a few steps on ONE GPU with ZeRO-3 and
# the optimizer offloaded to CPU, with --plugins tr_soft,flipguard (dpo when those are not installed).
# Prints step time, peak GPU and host memory, and aligner-estimate's prediction beside them. When the
# estimate says 32 layers cannot fit (GPU_MEM_GIB / HOST_MEM_GIB), it runs the largest layer count that does,
# and prints the estimate for all 32 layers on 8 GPUs. One run: a failure stops the script with its error.
#
#   bash benchmarks/scale_8b.sh            # from the repository root, on a machine with one GPU
#
# Needs torch with CUDA, transformers and deepspeed importable by $PYTHON (on the lent H100/H200, deepspeed and
# datasets come as wheels: pip install --no-index --no-deps --target /tmp/site .whl/*.whl; PYTHONPATH=/tmp/site).
# Writes the table to $WORK/scale_8b.md and appends it to benchmarks/RESULTS.md when WRITE=1.
set -euo pipefail

source "$(dirname "$0")/gpu_env.sh"
WORK=${WORK:-/tmp/aligner-scale-8b}
STEPS=${STEPS:-4}
GPU_MEM_GIB=${GPU_MEM_GIB:-78}
HOST_MEM_GIB=${HOST_MEM_GIB:-110}
CONFIG=configs/llama3-8b-zero3-offload.yaml
mkdir -p "$WORK"

PLUGINS=$("$PYTHON" benchmarks/scale_8b.py plugins)
# The run: 1 GPU, micro-batch 1 x 2048 tokens, no accumulation, no eval, a few steps.
SETS=(train.micro_batch_size=1 train.grad_accum=1 "train.max_steps=$STEPS" train.lr=1e-6 train.lr_schedule=constant
      train.warmup_steps=0 train.save_every=0 data.eval=null "data.train=$WORK/pairs.jsonl" "output_dir=$WORK/run")

echo "== estimate: all 32 layers on 1 GPU ($PLUGINS)"
"$PYTHON" benchmarks/scale_8b.py estimate --config "$CONFIG" --plugins "$PLUGINS" --layers 32 --gpus 1 \
    --gpu-mem-gib "$GPU_MEM_GIB" --set "${SETS[@]}"
LAYERS=$("$PYTHON" benchmarks/scale_8b.py fit --config "$CONFIG" --plugins "$PLUGINS" --gpu-mem-gib "$GPU_MEM_GIB" \
    --host-mem-gib "$HOST_MEM_GIB" --set "${SETS[@]}")
if [ "$LAYERS" -lt 32 ]; then
    echo "== 32 layers do not fit one GPU (${GPU_MEM_GIB} GiB) and ${HOST_MEM_GIB} GiB of host memory by the estimate; largest that does: $LAYERS"
    echo "== estimate: all 32 layers on 8 GPUs"
    "$PYTHON" benchmarks/scale_8b.py estimate --config "$CONFIG" --plugins "$PLUGINS" --layers 32 --gpus 8 --set "${SETS[@]}"
fi
[ "$LAYERS" -ge 1 ] || { echo "scale_8b: not even one layer fits by the estimate" >&2; exit 1; }

"$PYTHON" benchmarks/scale_8b.py write-data "$WORK/pairs.jsonl" --pairs $((STEPS * 2)) --tokens 2048
MODEL="$WORK/model-$LAYERS"
[ -f "$MODEL/config.json" ] || "$PYTHON" benchmarks/scale_8b.py write-model "$MODEL" --layers "$LAYERS"
rm -rf "$WORK/run"
echo "== training $LAYERS layers, $STEPS steps, --plugins $PLUGINS"
train_once "$WORK/train.log" --config "$CONFIG" --plugins "$PLUGINS,rss_probe:probe" --set "${SETS[@]}" \
    "model.name_or_path=$MODEL"

"$PYTHON" benchmarks/scale_8b.py summarize "$WORK/run" --config "$CONFIG" --plugins "$PLUGINS" --layers "$LAYERS" \
    --set "${SETS[@]}" "model.name_or_path=$MODEL" | tee "$WORK/scale_8b.md"
if [ "${WRITE:-0}" = 1 ]; then
    { echo; echo "### 8B on one GPU ($(date -u +%Y-%m-%d), $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1))"; echo;
      cat "$WORK/scale_8b.md"; echo; echo "Command: \`bash benchmarks/scale_8b.sh\`"; } >> benchmarks/RESULTS.md
fi
