#!/usr/bin/env bash
# The training step in graph mode on a GPU (issue 9's second device script, ~4 minutes): the
# graph-mode step with the fused path's math and the activation sign torch.compile'd
# (fused_bonn=compiled) next to the eager-math fused path, same run.
# Carry .data (see gpu_train_step.sh) and run:  COMMIT=<sha> bash benchmarks/gpu_train_step_graph.sh
OUT_DEFAULT=benchmarks/out/gpu_train_step_graph
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

echo "== 2. WRN-22-16 batch 128, graph mode"
timeout 150 $PY benchmarks/bench_train.py --device cuda --model wrn22 --width 16 --batch-size 128 \
    --steps 60 --repeats 2 --exec graph --modes none,xnor,bonn,bonn-c --profile 10 --profile-exec graph \
    --real-data /tmp/cifar10.npz >"$OUT/wrn22_16_b128_graph.md" 2>"$OUT/wrn22_16_b128_graph.log"
grep "^\[bench\]\|warning\|Error" "$OUT/wrn22_16_b128_graph.log" | tail -12
grep "^|\|^\[profile\]\|^device" "$OUT/wrn22_16_b128_graph.md"

echo "== 3. fit(): WRN-22-16 BONN, defaults, 6 epochs"
timeout 60 $PY -m trainables train --json --config model=wrn22 width=16 dataset=npz \
    data_root=/tmp/cifar10.npz device=cuda epochs=6 batch_size=128 feature_loss_start_epoch=3 \
    hist_epochs=[] >"$OUT/fit.jsonl" 2>"$OUT/fit.log"
grep -i "error\|warn\|\[I\] device" "$OUT/fit.log" | tail -3
$PY -c "
import json,sys
for l in open('$OUT/fit.jsonl'):
    m=json.loads(l)
    if 'epoch' in m: print('epoch', m['epoch'], 'images/s', round(m['images_per_s']), 'val_acc', round(m['val_acc'], 4))"
