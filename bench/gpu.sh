#!/usr/bin/env bash
# GPU figures in one unattended run (under 8 minutes on one H200): extraction img/s (both
# decode paths, --tokens all and pool:1) against the bare forward and the disk, fit
# samples/s resident and streamed against the bare training step, and a grid from the
# cache against online priors (see bench/README.md). Random-init weights, synthetic images
# written by the script, nothing downloaded. Exits at once without a GPU.
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
