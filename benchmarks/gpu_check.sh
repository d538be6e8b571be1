#!/usr/bin/env bash
# GPU fast paths against CPU float64, and their throughput, for ad2 and al6 (under 11 minutes),
# then the batched MD engine on the GPU by batch size, against CPU float64 and OpenMM CUDA.
# Runs as is on a machine with a GPU and no network: only the installed packages are used.
#   bash benchmarks/gpu_check.sh [PYTHON]       (default: .venv/bin/python if present, else python)
# Prints markdown tables (paste them into benchmarks/RESULTS.md); exit status non-zero if a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: no GPU visible"
"$PYTHON" -c "import torch, openmm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| openmm', openmm.__version__)"
# 460 s hard limit; rows still pending after 360 s are reported as skipped.
status=0
timeout 460 "$PYTHON" benchmarks/gpu_check.py --systems ad2 al6 --batch 512 --min-seconds 1 --budget-s 360 || status=$?
# Batched MD walkers (torch force field) on the GPU: 150 s budget, 200 s hard limit.
timeout 200 "$PYTHON" benchmarks/gpu_check.py --systems ad2 al6 --md-only --md-batches 1024 16384 --min-seconds 1 --budget-s 150 || status=$?
exit "$status"
