#!/usr/bin/env bash
# The GPU figures of the README's "GPU" section, in one run on one GPU machine.
#
# The machine needs python3 with jax (CUDA), flax, optax, orbax-checkpoint and PyTorch
# (the reference). What a GPU image often lacks and lensjax's train step needs,
# ml-collections and clu (pure Python), travels as wheels: on a machine with pip access,
# `make gpu-wheels` puts them in .whl/, and this script installs .whl/*.whl, if present,
# into a private folder first. TensorFlow and TFDS are not needed (without them the
# training loop writes its metrics to workdir/metrics.jsonl instead of TensorBoard, and
# only the DeepLense TFDS builders are unavailable).
#
#   experiments/benchmarks/gpu_run.sh [OUTDIR]        # default: $OUT, else runs/gpu
#
# Writes OUTDIR/machine.txt, one log and one JSON file per benchmark, and prints each
# table as it goes. GPU_RUN_QUICK=1 runs every step with tiny batches and short rounds
# (a check of the script itself, on any machine). GPU_RUN_PIPELINE=1 adds the input
# pipeline benchmark at batch 256 (or run it alone in a second call, as the README says).
set -uo pipefail
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out" && out=$(cd "$out" && pwd)   # as given from the caller's folder
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 LENSJAX_HUGEPAGES=0   # the heap tunables are for XLA:CPU

if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/lensjax-gpu-site
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || { echo "installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  "$python" -c "import jax, torch, flax; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, '| torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$out/machine.txt"

if [ "${GPU_RUN_QUICK:-0}" = 1 ]; then
  classifier_batch=4; mae_batch=4; unet_batch=1; timing=(--rounds 2 --round-seconds 0.3)
  pipeline_args=(--quick --batch-size 8)
  sim_args=(--batch-size 8 --seconds 0.3 --rounds 1 --skip-lenstronomy --cases model_ii:no_sub)
else
  # Sized for one 10-minute call with compilation (estimated: not yet run on a GPU).
  classifier_batch=256; mae_batch=256; unet_batch=32; timing=(--rounds 3 --round-seconds 2)
  # model_ii cdm is left out: XLA took minutes to compile it for a GPU (README).
  sim_args=(--batch-size 4096 --seconds 3 --skip-lenstronomy
            --cases model_i:no_sub,model_i:cdm,model_i:axion,model_ii:no_sub,model_ii:axion)
  pipeline_args=(--batch-size 256 --rounds 5)
fi

status=0
bench() {  # bench NAME SCRIPT ARGS...: one benchmark, its log and JSON under $out
  local name=$1 script=$2
  shift 2
  echo "== $script $*"
  "$python" "experiments/benchmarks/$script" "$@" --json "$out/$name.json" 2>&1 \
    | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}

# Issue targets: ResNet-18 >= 1.3x PyTorch (AMP, channels_last), ViT-MAE >= 40% MFU.
bench train_bf16 bench_train.py --dtype bfloat16 --batch-size "$classifier_batch" \
  --models resnet18_64,resnet18_150 "${timing[@]}"
bench train_bf16_mae bench_train.py --dtype bfloat16 --batch-size "$mae_batch" \
  --models mae_vits_64 "${timing[@]}"
bench train_bf16_unet bench_train.py --dtype bfloat16 --batch-size "$unet_batch" \
  --models unet_150 "${timing[@]}"
bench sim bench_sim.py "${sim_args[@]}"
# Issue target: the simulated stream costs under 5% of the steps/s of a constant batch.
# Opt-in (GPU_RUN_PIPELINE=1; always with GPU_RUN_QUICK=1): the demo's stream simulates
# model_ii cdm, whose GPU compilation took minutes (above): it may not fit in one call.
if [ "${GPU_RUN_PIPELINE:-0}" = 1 ] || [ "${GPU_RUN_QUICK:-0}" = 1 ]; then
  bench pipeline bench_pipeline.py "${pipeline_args[@]}"
fi
exit $status
