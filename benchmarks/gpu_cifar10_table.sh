#!/usr/bin/env bash
# The paper's CIFAR-10 table on a lent GPU (learning issue, step 4): WRN-22 16-16-32-64, the rows of
# benchmarks/cifar10_table.py (fp, bnn_plain, xnor, bonn_kernel, bonn_both, theta_1e-3, theta_1e-4 with the
# tuned recipe, and both_literal = the paper's literal recipe), concurrently on one card, on the CIFAR-10 JPEG copy.
#
# Carry the JPEG bytes (.data/cifar10-jpeg.jpgpack.npz, 54 MiB:
#   python scripts/pack_jpeg_bytes.py pack data/cifar10-jpeg .data/cifar10-jpeg.jpgpack.npz)
# with carry=[".data"] (with .data/resume1.tgz and resume2.tgz of an earlier call, to resume), then run
#   bash benchmarks/gpu_cifar10_table.sh [EPOCHS] [LIMIT_S]
# Every LIMIT_S/10 seconds and at the end it packs what exists into $OUT: table.log, results.tgz (per-epoch
# logs, final.json, the Fig. 3 PNGs) and resume1.tgz + resume2.tgz (the checkpoints of every row; carried
# back as .data/resume{1,2}.tgz, the rows resume where they stopped). Rows still running at LIMIT_S are stopped by SIGTERM.
# CPU dry run: DATA=data/cifar10-jpeg-10000-s0.npz ROWS=bnn_plain,bonn_both PY=.venv/bin/python \
#   OUT=/tmp/gpu_dry bash benchmarks/gpu_cifar10_table.sh 1 300
set -uo pipefail
EPOCHS="${1:-200}"
LIMIT_S="${2:-540}"
OUT="${OUT:-benchmarks/out/gpu_cifar10}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/cifar10_table}"; mkdir -p "$WORK"
PY="${PY:-python3}"
ROWS="${ROWS:-fp,bnn_plain,xnor,bonn_kernel,bonn_both,theta_1e-3,theta_1e-4,both_literal}"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  git rev-parse HEAD 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; } > "$WORK/card.txt"
DATA="${DATA:-/tmp/cifar10.npz}"
if [ ! -f "$DATA" ]; then
  $PY scripts/pack_jpeg_bytes.py unpack .data/cifar10-jpeg.jpgpack.npz "$DATA" --workers 16 || exit 1
fi
for f in .data/resume1.tgz .data/resume2.tgz; do [ -f "$f" ] && tar -xzf "$f" -C "$WORK"; done
pack() {
  (cd "$WORK" && tar -czf "$OUT/results.tgz.tmp" --exclude='*/ckpt' . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz")
  # the checkpoints in two files (a returned file holds at most 16 MiB; 8 rows are about 22 MB)
  local ck=($(cd "$WORK" && ls -d */ckpt 2>/dev/null)) half i
  half=$(( (${#ck[@]} + 1) / 2 ))
  for i in 1 2; do
    local part=("${ck[@]:$(( (i - 1) * half )):$half}")
    [ ${#part[@]} -gt 0 ] || continue
    (cd "$WORK" && tar -czf "$OUT/resume$i.tgz.tmp" "${part[@]}" && mv "$OUT/resume$i.tgz.tmp" "$OUT/resume$i.tgz")
  done
}
$PY benchmarks/cifar10_table.py --data "$DATA" --epochs "$EPOCHS" --rows "$ROWS" --out "$WORK" \
    > "$OUT/table.log" 2>&1 &
pid=$!
start=$(date +%s); every=$(( LIMIT_S / 10 > 10 ? LIMIT_S / 10 : 10 ))
while kill -0 "$pid" 2>/dev/null; do
  sleep "$every"; pack
  if [ $(( $(date +%s) - start )) -ge "$LIMIT_S" ]; then
    echo "[limit] ${LIMIT_S}s reached: stopping the unfinished rows (resume1/2.tgz have their checkpoints)" >> "$OUT/table.log"
    pkill -TERM -P "$pid"; kill -TERM "$pid"; sleep 5; break
  fi
done
wait "$pid" 2>/dev/null
pack
tail -n 15 "$OUT/table.log"
