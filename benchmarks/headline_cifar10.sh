#!/usr/bin/env bash
# The headline study on a lent GPU (confirmation issue, step 5), through the real service path: the
# embedded stack (Ray head, MLflow server, the API) plus a Ray worker node with the GPU, one StudySpec
# POSTed over HTTP -- WRN-22-16 on the CIFAR-10 JPEG copy, the `bonn-paper` space, ASHA (grace GRACE,
# reduction 3), EPOCHS for every trial and the paper's warm start alike, CONCURRENT trials sharing the
# card (gpus_per_trial 1/CONCURRENT), then the confirmation of the best configuration and the paper's
# point over SEEDS seeds. Results appear under $OUT while it runs (benchmarks/headline_study.py):
# progress.log, study.json (with `confirmation`), trials.json, then results.md, driver.log, confirmation.png.
#
#   bash benchmarks/headline_cifar10.sh [TRIALS=12] [EPOCHS=15] [SEEDS=3] [LIMIT_S=500] [CONCURRENT=4] [GRACE=3]
#
# The device image has torch but no ray, optuna or mlflow, and 64 MiB travel per call, so two calls on a
# warm machine: (1) carry=[".data"] with .data/wheels/ (ray[default] without its jars, optuna, mlflow and
# their missing deps: `pip download -d .data/wheels ...` here) -- this script installs them into
# /tmp/pylib and exits when DATA is absent; (2) carry=[".data"] with .data/cifar10-jpeg.jpgpack.npz
# (54 MiB) -- decoded to /tmp/headline/cifar10.npz, then the study runs. Sizing: at ~40k images/s per
# card, an epoch of 45k images is ~1.2 s of training; 12 trials x 15 epochs under ASHA are ~60-80 epochs,
# the confirmation (1 + 1) x 3 x 15 = 90 epochs: the defaults fit one 10-minute call with margin.
#
# CPU dry run (digits, tiny budget, no GPU worker; same code path):
#   DATASET=digits MODEL=small_cnn WORKER_GPUS=0 GPUS_PER_TRIAL=0 PY=.venv/bin/python OUT=/tmp/headline_dry \
#     bash benchmarks/headline_cifar10.sh 3 2 2 300 2 1
set -uo pipefail
TRIALS="${1:-12}"; EPOCHS="${2:-15}"; SEEDS="${3:-3}"; LIMIT_S="${4:-500}"; CONCURRENT="${5:-4}"; GRACE="${6:-3}"
OUT="${OUT:-benchmarks/out/headline}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/headline}"; mkdir -p "$WORK"
PY="${PY:-python3}"
DATASET="${DATASET:-npz}"; MODEL="${MODEL:-wrn22}"
WORKER_GPUS="${WORKER_GPUS:-1}"; GPUS_PER_TRIAL="${GPUS_PER_TRIAL:-$($PY -c "print(1/$CONCURRENT)")}"
CPUS="$(nproc)"; CPUS_PER_TRIAL="${CPUS_PER_TRIAL:-$(( (CPUS - 2) / CONCURRENT > 0 ? (CPUS - 2) / CONCURRENT : 1 ))}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; date -u
  echo "args: trials=$TRIALS epochs=$EPOCHS seeds=$SEEDS limit=$LIMIT_S concurrent=$CONCURRENT grace=$GRACE"; } > "$OUT/card.txt"

# 1. ray, optuna, mlflow: from carried wheels when the image lacks them
if ! $PY -c "import ray, optuna, mlflow" 2>/dev/null; then
  if [ -d .data/wheels ]; then
    $PY -m pip install -q --no-index --find-links .data/wheels --target /tmp/pylib \
        "ray[tune,default]==2.60.0" optuna==5.0.0 mlflow==3.17.2 2>&1 | tail -3 | tee -a "$OUT/card.txt"
  fi
  $PY -c "import ray, optuna, mlflow" || { echo "ray/optuna/mlflow missing: carry .data/wheels first"; exit 3; }
fi

# 2. the data
DATA_ROOT=""
if [ "$DATASET" = "npz" ]; then
  DATA_ROOT="${DATA:-$WORK/cifar10.npz}"
  if [ ! -f "$DATA_ROOT" ]; then
    [ -f .data/cifar10-jpeg.jpgpack.npz ] || { echo "deps ready; carry .data/cifar10-jpeg.jpgpack.npz next"; exit 0; }
    timeout 150 $PY scripts/pack_jpeg_bytes.py unpack .data/cifar10-jpeg.jpgpack.npz "$DATA_ROOT" --workers "$CPUS" \
        2>&1 | tail -2 || exit 4
  fi
fi

# 3. the study, watched; cancelled at LIMIT_S (partial results are still written)
$PY benchmarks/headline_study.py --out "$OUT" --home "$WORK" --dataset "$DATASET" ${DATA_ROOT:+--data-root "$DATA_ROOT"} \
    --model "$MODEL" --trials "$TRIALS" --epochs "$EPOCHS" --seeds "$SEEDS" --grace "$GRACE" \
    --concurrent "$CONCURRENT" --gpus-per-trial "$GPUS_PER_TRIAL" --cpus-per-trial "$CPUS_PER_TRIAL" \
    --worker-gpus "$WORKER_GPUS" --worker-cpus "$(( CPUS - 2 > 1 ? CPUS - 2 : 1 ))" --limit-s "$LIMIT_S" \
    2>&1 | tail -n 400 > "$OUT/run.log"
rc=${PIPESTATUS[0]}
tail -n 25 "$OUT/run.log"
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
exit "$rc"
