#!/usr/bin/env bash
# GPU fast paths against CPU float64, and their throughput, for ad2 and al6 (under 8 minutes).
# Runs as is on a machine with a GPU and no network: only the installed packages are used.
#   bash benchmarks/gpu_check.sh [PYTHON]       (default: .venv/bin/python if present, else python)
# Prints a markdown table (paste it into benchmarks/RESULTS.md); exit status 1 if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: no GPU visible"
"$PYTHON" -c "import torch, openmm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| openmm', openmm.__version__)"
# 460 s hard limit; rows still pending after 360 s are reported as skipped.
timeout 460 "$PYTHON" benchmarks/gpu_check.py --systems ad2 al6 --batch 512 --min-seconds 1 --budget-s 360
