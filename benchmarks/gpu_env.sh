# Sourced by the one-GPU scripts (scale_8b.sh, lora_8b.sh): the Python to use, offline Hub, the CUDA arch list
# for DeepSpeed's JIT ops, this checkout and benchmarks/ importable, and aligner installed (editable, no
# dependencies) so that its plugins are found through their entry points.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
export HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import importlib.metadata as m; m.distribution('aligner')" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . || "$PYTHON" -m pip install -q --user --no-deps --no-build-isolation -e .
fi

# train_once LOG ARGS...: one training run through the DeepSpeed launcher on one GPU; on failure, the log's last
# lines and exit 1 (no retry with another size: a failure is reported as it is).
train_once() {
    local log=$1; shift
    if ! "$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "$@" > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "training failed (whole log: $log)" >&2
        exit 1
    fi
    tail -n 5 "$log"
}
