#!/usr/bin/env bash
# The GPU benchmarks in one short call, on a machine that has CUDA PyTorch but no package index.
#
#   make gpu-wheels          # on a machine with the index, once: MONAI and nibabel wheels into bench/wheels/
#   bash bench/gpu_run.sh    # on the GPU machine: installs those wheels, checks the GPU, runs the benchmarks
#
# Results are written to bench/results/ (and copied to $OUT when it is set). Each benchmark has a time limit so
# that the whole call fits a 10-minute command (the case benchmark writes the kit's figures before it starts the
# naive reference, so a cut-short run still leaves them); on a machine of your own, raise the limits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MEM_LIMIT_S=${MEM_LIMIT_S:-90}
CASE_LIMIT_S=${CASE_LIMIT_S:-330}
REG_LIMIT_S=${REG_LIMIT_S:-120}

shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install --quiet --no-deps --no-index "${wheels[@]}"
fi
"$PY" - <<'PY'
import torch, monai
assert torch.cuda.is_available(), "no CUDA device is visible to this Python"
print(f"torch {torch.__version__}, MONAI {monai.__version__}, {torch.cuda.get_device_name(0)}")
PY
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout "$MEM_LIMIT_S" "$PY" bench/paper_memory.py --device cuda || echo "paper_memory.py: exit $?"  # 16 GB?
timeout "$CASE_LIMIT_S" "$PY" bench/isl_case.py --device cuda || echo "isl_case.py: exit $?"   # paper-like case
timeout "$REG_LIMIT_S" "$PY" bench/registration.py --device cuda --atlases 24 --shape 128 128 96 \
    || echo "registration.py: exit $?"                                                   # iterations alone
if [ -n "${OUT:-}" ]; then
    cp bench/results/* "$OUT"/
fi
