# Sourced by the GPU device scripts: $OUT, $PY, card.txt (card, commit, torch, date), the CIFAR-10
# JPEG copy decoded to /tmp/cifar10.npz from the carried .data/cifar10-jpeg.jpgpack.npz, and the
# CUDA tests (tests/unit/test_cuda_graph.py, tests/unit/test_fused.py) logged to $OUT/tests.log.
# Call as: OUT_DEFAULT=benchmarks/out/NAME; source benchmarks/gpu_common.sh
set -uo pipefail
OUT="${OUT:-$OUT_DEFAULT}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; date -u; } | tee "$OUT/card.txt"
[ -f /tmp/cifar10.npz ] || timeout 120 $PY scripts/pack_jpeg_bytes.py unpack .data/cifar10-jpeg.jpgpack.npz \
    /tmp/cifar10.npz --workers 16 2>&1 | tail -2

echo "== 1. CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph.py tests/unit/test_fused.py 2>&1 \
    | tee "$OUT/tests.log" | tail -8
