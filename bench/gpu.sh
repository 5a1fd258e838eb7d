#!/usr/bin/env bash
# GPU figures in one unattended run (under 10 minutes on one CUDA GPU): extraction img/s
# against the bare forward (ViT-B, bf16, batch 256) and fit samples/s with the tokens on
# the device and streamed, against the bare training step. Random-init weights, synthetic
# images written by the script, nothing downloaded. Exits at once without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch ($PYTHON) on this machine; nothing measured" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 570 "$PYTHON" bench/gpu.py "$@"
