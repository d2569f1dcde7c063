#!/usr/bin/env bash
# The training-step speed checks on a GPU (issue 9) as one prepared script (one GPU machine call,
# ~6 minutes).
# Carry the CIFAR-10 JPEG bytes (.data/cifar10-jpeg.jpgpack.npz, 54 MiB, made with
#   python scripts/pack_jpeg_bytes.py pack <CIFAR-10-images checkout> .data/cifar10-jpeg.jpgpack.npz)
# with carry=[".data"], and run:  COMMIT=<sha> bash benchmarks/gpu_train_step.sh
# Stages, most important first; each has its own time limit and writes under $OUT:
#   1. CUDA tests: captured step == eager step, fused == reference path (tests/unit/test_cuda_graph.py,
#      tests/unit/test_fused.py);
#   2. WRN-22-16, batch 128 (the paper's): none / xnor / bonn-ref / bonn, eager, CUDA graph and
#      compiled + CUDA graph, random data and the real pipeline, 2 repeats, plus profiles of none and
#      bonn with the kernels bonn adds;
#   3. fit(): WRN-22-16 BONN on CIFAR-10 for a few epochs (images/s of the real training loop; the
#      feature loss switched on 4 epochs before the end, which re-captures the step);
#   4. CIFAR ResNet-18 at batch 512, CUDA graph and compiled.
# (The first run of this script, at commit 092d05a, also timed WRN-22-64 and ResNet-18 at batch 128
# and 512 and WRN-22-16 at 512: see benchmarks/RESULTS.md.)
OUT_DEFAULT=benchmarks/out/gpu_train_step
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

echo "== 2. WRN-22-16 batch 128"
timeout 300 $PY benchmarks/bench_train.py --device cuda --model wrn22 --width 16 --batch-size 128 \
    --steps 60 --repeats 2 --exec eager,graph,compile --profile 10 --profile-exec graph,compile \
    --real-data /tmp/cifar10.npz >"$OUT/wrn22_16_b128.md" 2>"$OUT/wrn22_16_b128.log"
grep "^\[bench\]\|warning\|Error" "$OUT/wrn22_16_b128.log" | tail -24
grep "^|\|^\[profile\]\|^device" "$OUT/wrn22_16_b128.md"

echo "== 3. fit(): WRN-22-16 BONN, CIFAR-10 JPEG copy, ${FIT_EPOCHS:=12} epochs"
timeout 90 $PY -m trainables train --json --config model=wrn22 width=16 dataset=npz \
    data_root=/tmp/cifar10.npz device=cuda epochs="$FIT_EPOCHS" batch_size=128 \
    feature_loss_start_epoch=$((FIT_EPOCHS - 4)) hist_epochs=[] >"$OUT/fit.jsonl" 2>"$OUT/fit.log"
grep -i "error\|cuda_graph\|\[I\] device" "$OUT/fit.log" | tail -3; $PY - "$OUT/fit.jsonl" <<'EOF2'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if "epoch" in m:
        print(f"epoch {m['epoch']:3d} images/s {m.get('images_per_s', 0):8.0f} val_acc {m.get('val_acc', 0):.4f} "
              f"train_loss {m.get('train_loss', 0):.4f} feature_loss {m.get('feature_loss', 0):.5f}")
EOF2

echo "== 4. CIFAR ResNet-18 batch 512 (real pipeline), graph and compile"
timeout 120 $PY benchmarks/bench_train.py --device cuda --model resnet18 --width 64 --batch-size 512 \
    --steps 30 --repeats 1 --exec graph,compile --modes none,xnor,bonn --no-random \
    --real-data /tmp/cifar10.npz >"$OUT/resnet18_64_b512.md" 2>"$OUT/others.log"
grep "^|\|warning" "$OUT/resnet18_64_b512.md" "$OUT/others.log" | tail -8
