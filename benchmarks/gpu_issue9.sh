#!/usr/bin/env bash
# Issue 9's device checks as one prepared script (one GPU machine call, ~8 minutes).
# Carry the CIFAR-10 JPEG bytes (.data/cifar10-jpeg.jpgpack.npz, 54 MiB, made with
#   python scripts/pack_jpeg_bytes.py pack <CIFAR-10-images checkout> .data/cifar10-jpeg.jpgpack.npz)
# with carry=[".data"], and run:  COMMIT=<sha> bash benchmarks/gpu_issue9.sh
# Stages, most important first; each has its own time limit and writes under $OUT:
#   1. CUDA tests: captured step == eager step, fused == reference path (tests/unit/test_cuda_graph.py,
#      tests/unit/test_fused.py);
#   2. WRN-22-16, batch 128 (the paper's): none / xnor / bonn-ref / bonn, eager and CUDA graph, random
#      data and the real pipeline, 3 repeats, plus a profile of each BONN variant;
#   3. fit(): WRN-22-16 BONN on CIFAR-10 for a few epochs (images/s of the real training loop);
#   4. WRN-22-64 and ResNet-18 at batch 128 and 512, WRN-22-16 at 512 (real pipeline).
set -uo pipefail
OUT="${OUT:-benchmarks/out/gpu9}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; date -u; } | tee "$OUT/card.txt"

[ -f /tmp/cifar10.npz ] || timeout 120 $PY scripts/pack_jpeg_bytes.py unpack .data/cifar10-jpeg.jpgpack.npz \
    /tmp/cifar10.npz --workers 16 2>&1 | tail -2

echo "== 1. CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph.py tests/unit/test_fused.py 2>&1 \
    | tee "$OUT/tests.log" | tail -15

echo "== 2. WRN-22-16 batch 128"
timeout 240 $PY benchmarks/bench_train.py --device cuda --model wrn22 --width 16 --batch-size 128 \
    --steps 60 --repeats 3 --profile 10 --real-data /tmp/cifar10.npz >"$OUT/wrn22_16_b128.md" 2>"$OUT/wrn22_16_b128.log"
grep "^\[bench\]\|warning\|Error" "$OUT/wrn22_16_b128.log" | tail -20
grep -v "^\s*aten::\|^---\|Self CPU\|Name " "$OUT/wrn22_16_b128.md" | grep -v "^\s*$" | head -40

echo "== 3. fit(): WRN-22-16 BONN, CIFAR-10 JPEG copy, ${FIT_EPOCHS:=12} epochs"
timeout 150 $PY -m trainables train --json --config model=wrn22 width=16 dataset=npz \
    data_root=/tmp/cifar10.npz device=cuda epochs="$FIT_EPOCHS" batch_size=128 \
    feature_loss_start_epoch=$((FIT_EPOCHS - 4)) hist_epochs=[] >"$OUT/fit.jsonl" 2>"$OUT/fit.log"
tail -3 "$OUT/fit.log"; $PY - "$OUT/fit.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if "epoch" in m:
        print(f"epoch {m['epoch']:3d} images/s {m.get('images_per_s', 0):8.0f} "
              f"val_acc {m.get('val_acc', 0):.4f} train_loss {m.get('train_loss', 0):.4f}")
EOF

echo "== 4. other models and batch sizes (real pipeline)"
for spec in "wrn22 64 128" "resnet18 64 128" "wrn22 64 512" "resnet18 64 512" "wrn22 16 512"; do
  set -- $spec
  timeout 100 $PY benchmarks/bench_train.py --device cuda --model "$1" --width "$2" --batch-size "$3" \
      --steps 30 --repeats 1 --modes none,bonn-ref,bonn --no-random --real-data /tmp/cifar10.npz \
      >"$OUT/${1}_${2}_b${3}.md" 2>>"$OUT/others.log"
  tail -3 "$OUT/${1}_${2}_b${3}.md"
done
grep "warning" "$OUT/others.log" | sort | uniq -c | head
