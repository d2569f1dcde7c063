#!/usr/bin/env bash
# Issue 7's device checks as one prepared script, for a session that has a GPU machine.
# Carry the CIFAR-10 JPEG bytes (.data/cifar10-jpeg.jpgpack.npz, 54 MiB, made here with
#   python scripts/pack_jpeg_bytes.py pack <CIFAR-10-images checkout> .data/cifar10-jpeg.jpgpack.npz)
# with carry=[".data"], and run:  bash benchmarks/gpu_suite.sh [EPOCHS]
# Everything it prints and writes goes under $OUT (or benchmarks/out/gpu when $OUT is unset).
set -uo pipefail
EPOCHS="${1:-15}"
OUT="${OUT:-benchmarks/out/gpu}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/card.txt"
$PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/card.txt"

# 0. decode the carried JPEG bytes into the uint8 .npz that trainables reads (~10 s on 16 cores)
[ -f /tmp/cifar10.npz ] || $PY scripts/pack_jpeg_bytes.py unpack .data/cifar10-jpeg.jpgpack.npz /tmp/cifar10.npz --workers 16

# 1. training images/s: none / xnor / bonn (both losses), random data on the GPU and the real pipeline
for spec in "resnet18 64" "wrn22 16" "wrn22 64"; do
  set -- $spec
  $PY benchmarks/bench_train.py --device cuda --model "$1" --width "$2" --batch-size 512 --steps 50 \
      --compile --repeats 3 --real-data /tmp/cifar10.npz 2>&1 | tee -a "$OUT/speed.md"
done

# 2. several small trials sharing the card: 1, 2, 4, 8 concurrent WRN-22-16 trainings (batch 128)
$PY benchmarks/bench_shared_gpu.py --device cuda --model wrn22 --width 16 --batch-size 128 \
    --procs 1,2,4,8 --seconds 15 2>&1 | tee "$OUT/shared.md"

# 3. the CIFAR-10 table rows, concurrently on the card, the paper's recipe scaled to EPOCHS
$PY benchmarks/cifar10_table.py --data /tmp/cifar10.npz --epochs "$EPOCHS" --out "$OUT/cifar10" 2>&1 \
    | tee "$OUT/cifar10.log" | grep -v "^\[" 
