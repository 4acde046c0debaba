#!/usr/bin/env bash
# Create (or update) the benchmark environment for benchmarks.compare_peers: a separate
# virtualenv OUTSIDE the repository with the peers gradcam_jax is compared against.
#
#   bash benchmarks/setup_peers.sh                  # -> ../bench-venv beside the repository
#   BENCH_VENV=~/venvs/peers bash benchmarks/setup_peers.sh
#   PYTHON=python3.12 bash benchmarks/setup_peers.sh
#
# It installs torch 2.14.1 + torchvision 0.29.1 (a matching pair: pytorch-grad-cam imports
# torchvision), grad-cam (pytorch-grad-cam), captum and efficientnet-lite-pytorch (the torch
# reference for the zoo's EfficientNet-Lite0), then this checkout in editable mode. The torch
# wheel is a CUDA build (about 5.5 GB with its CUDA libraries); it also runs on a CPU. That is
# too heavy for CI, which never runs this: the project's own dev environment keeps its CPU-only
# torch 2.13.0 and is not touched.
#
# Idempotent: an existing environment is reused and only what is missing or at another version
# is installed; a second run with everything in place takes seconds. Then:
#
#   "$BENCH_VENV/bin/python" -m benchmarks.compare_peers --quick     # from the repository root
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BENCH_VENV="${BENCH_VENV:-$(dirname "$REPO")/bench-venv}"
PYTHON="${PYTHON:-python3}"

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
PEERS=(grad-cam captum efficientnet-lite-pytorch zennit saliency torchcam)

case "$BENCH_VENV" in
  "$REPO"|"$REPO"/*)
    echo "BENCH_VENV=$BENCH_VENV is inside the repository; put it outside (it is ~5.5 GB)." >&2
    exit 2 ;;
esac

if [ ! -x "$BENCH_VENV/bin/python" ]; then
  echo "creating $BENCH_VENV"
  "$PYTHON" -m venv "$BENCH_VENV"
fi
PY="$BENCH_VENV/bin/python"

# Already complete? (torch and torchvision at the pinned versions, the peers importable, this
# checkout installed.) Then there is nothing to do.
if "$PY" - "$REPO" <<'EOF' 2>/dev/null
import importlib, importlib.metadata as md, pathlib, sys
assert md.version("torch").split("+")[0] == "2.14.1"
assert md.version("torchvision").split("+")[0] == "0.29.1"
for module in ("pytorch_grad_cam", "captum.attr", "efficientnet_lite_pytorch", "gradcam_jax"):
    importlib.import_module(module)
import gradcam_jax
assert pathlib.Path(gradcam_jax.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve())
EOF
then
  echo "$BENCH_VENV is complete: torch 2.14.1, torchvision 0.29.1, grad-cam, captum, gradcam_jax (editable)"
else
  echo "installing into $BENCH_VENV (torch + CUDA libraries: about 5.5 GB the first time)"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install "${TORCH_PINS[@]}" "${PEERS[@]}"
  # The checkout, editable; its dependencies (jax, flax, ...) resolve beside the torch pair.
  "$PY" -m pip install -e "$REPO" "${TORCH_PINS[@]}"
fi

"$PY" - <<'EOF'
import importlib.metadata as md
names = ("torch", "torchvision", "grad-cam", "captum", "efficientnet-lite-pytorch", "jax", "flax", "gradcam-jax")
print("  " + ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
echo "run:  cd $REPO && $PY -m benchmarks.compare_peers --quick"
