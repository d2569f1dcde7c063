#!/usr/bin/env bash
# Issue 19 ("Fill the GPU"), items 1 and 3, as ONE prepared device script; stages chosen by argument:
#   shared   N concurrent WRN-22-16 trainings (batch 128, real CIFAR-10 pipeline, the product's CUDA step:
#            fused compiled math + CUDA graph) on one card, time-sliced and under MPS, N = 1,2,4,8,16
#            (benchmarks/bench_shared_gpu.py) -> shared.json (rewritten after every row), shared.md
#   step     item 3: the training step of WRN-22-64 and CIFAR ResNet-18 (width 64) at batch 128 and 512,
#            none / xnor / bonn / bonn-c, step captured as a CUDA graph, with the profile (kernels/step,
#            GPU busy vs wall, the kernels bonn adds) (benchmarks/bench_train.py) -> step.md
#   multi    several trials in one process (benchmarks/bench_multi_trial.py, if it exists) -> multi.json
#   data     only decode the carried CIFAR-10 JPEG bytes to /tmp/cifar10.npz (every stage that needs
#            them does it too, once per machine)
#   service  the shared measure through the real service path (start_stack(num_gpus=1, mps=...), one
#            StudySpec over HTTP, the trials' own images_per_s) for N = 1 and the best N of `shared`
#            (benchmarks/bench_shared_gpu_service.py) -> service.json, service.md; needs ray/optuna/mlflow
# Always: card.txt (card, compute mode, MPS program, commit, torch, date) and log.txt (every stage's
# output). At most 8 files under $OUT in all: card.txt log.txt shared.json shared.md step.md multi.json
# service.json service.md. Each stage runs under its own `timeout`, cut to what is left of CALL_LIMIT_S,
# so one hang cannot eat the call; a stage's files are written as its results appear.
#
# Device calls (a session with a lent GPU makes them, helpers never do), on one warm machine:
#   1. command: bash benchmarks/gpu_fill.sh shared,step,multi
#      carry: [".data"] holding .data/cifar10-jpeg.jpgpack.npz (54 MiB; scripts/pack_jpeg_bytes.py pack)
#      timeout_s: 600 (CALL_LIMIT_S defaults to 570: each stage's timeout is cut to what is left of it)
#      expected (estimates; nothing here was timed on a GPU): card + decode ~0.3 min; shared ~4 min
#      (N = 1,2,4,8,16, each N time-sliced then under MPS: 10 rows of ~10-30 s start and warm-up + a 5 s
#      window; the first row also compiles the fused math cold -- its warm-up s shows it, later rows hit
#      the inductor cache under /tmp, logged before and after); step ~3-4 min (4 runs x 4 modes, each run
#      at most 60 s); multi <= 2 min if the script exists. Total ~7.5-9.5 min.
#   2. at once (warm machine: /tmp/cifar10.npz and /tmp/fill/shared.json are still there):
#      command: CALL_LIMIT_S=450 bash benchmarks/gpu_fill.sh service
#      carry: [".data"] holding .data/wheels/ only (ray stripped of its jars, optuna, mlflow and the
#      deps ../shared/docs/stack-notes.md lists; about 51 MiB: the data pack cannot travel with it)
#      timeout_s: 480; expected: wheel install ~1 min, then MPS and time-sliced stacks (~15 s start each)
#      with studies of N = 1 and the best N of shared.json (SERVICE_N=8 sets it; default 4), 3 epochs
#      per trial: ~3-5 min.
#   Then give_back. Both calls and the start (~1.5 min) are ~13-16 minutes: about a whole session's
#   15 minutes, with no room for a rerun. With less than ~11 minutes left run call 1 only (or SHARED_PROCS=1,4,16
#   bash benchmarks/gpu_fill.sh shared: ~2.5 min). On a fresh machine `service` needs the data first:
#   `bash benchmarks/gpu_fill.sh data` (carry the pack, ~0.5 min), then call 2 at once.
#
# CPU dry run (tiny models and steps, the same code paths; MPS through tests/fakes):
#   DEVICE=cpu PY=/work/main/.venv/bin/python OUT=/tmp/fill_dry bash benchmarks/gpu_fill.sh shared,step,multi,service
set -uo pipefail
STAGES="${1:-shared,step,multi}"
OUT="${OUT:-benchmarks/out/fill}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/fill}"; mkdir -p "$WORK"
PY="${PY:-python3}"
DEVICE="${DEVICE:-cuda}"
CALL_LIMIT_S="${CALL_LIMIT_S:-570}"
PACK="${PACK:-.data/cifar10-jpeg.jpgpack.npz}"
LOG="$OUT/log.txt"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/pylib"
if [ "$DEVICE" = cpu ]; then
  # stand-ins for nvidia-smi -L and the MPS control program, so the MPS rows run their code path
  export PATH="$PWD/tests/fakes:$PATH" FAKE_GPUS=1
  DATA="${DATA:-$WORK/tiny.npz}"
  MODEL=small_cnn; WIDTH=16; BATCH=64; SHARED_PROCS="${SHARED_PROCS:-1,2}"; SHARED_S="${SHARED_S:-2}"
  STEP_SPECS="small_cnn:8:16 small_cnn:8:32"; STEP_STEPS=2; STEP_EXEC=eager; PROFILE=2; STEP_MAX=150; MULTI_ARGS="--model wrn22 --width 4 --batch-size 16 --ks 1,2 --steps 2"
  SVC_ARGS="--procs 2 --epochs 2"
else
  DATA="${DATA:-/tmp/cifar10.npz}"
  MODEL=wrn22; WIDTH=16; BATCH=128; SHARED_PROCS="${SHARED_PROCS:-1,2,4,8,16}"; SHARED_S="${SHARED_S:-5}"
  STEP_SPECS="wrn22:64:128 wrn22:64:512 resnet18:64:128 resnet18:64:512"; STEP_STEPS="${STEP_STEPS:-30}"
  STEP_EXEC="${STEP_EXEC:-graph}"  # STEP_EXEC=graph,compile adds torch.compile'd models (~30-60 s each, cold)
  PROFILE=10; STEP_MAX=60
  MULTI_ARGS="--model wrn22 --width 16 --batch-size 128 --ks 1,2,4,8,16 --steps ${MULTI_STEPS:-100}"
fi

say() { echo "== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG" >&2; }  # stderr: never into a stage's file
has() { [[ ",$STAGES," == *",$1,"* ]]; }
# budget MAX: seconds for the next stage, at most MAX and what is left of the call (15 s kept for the end)
budget() { local left=$(( CALL_LIMIT_S - ($(date +%s) - T0) - 15 )); echo $(( left < $1 ? left : $1 )); }
run_stage() {  # run_stage NAME MAX_S CMD...: under timeout, output appended to log.txt
  local name=$1 b; b=$(budget "$2"); shift 2
  if [ "$b" -lt 20 ]; then say "$name: skipped, only ${b}s left of the call"; return 124; fi
  say "$name: start (limit ${b}s)"
  timeout -k 20 "$b" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}; say "$name: exit $rc"; return "$rc"
}

# -- card.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv 2>/dev/null || echo "no GPU (DEVICE=$DEVICE)"
  echo "mps control: $(command -v nvidia-cuda-mps-control || echo 'not on PATH')"
  echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  date -u; echo "stages: $STAGES; cpus $(nproc)"; } > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt" | tee -a "$LOG"

# -- data: the carried JPEG bytes decoded once per machine (a warm second call finds them)
need_data() { has data || has shared || has step || has service; }
if need_data && [ ! -f "$DATA" ]; then
  if [ "$DEVICE" = cpu ] && [ ! -f "$PACK" ]; then
    PACK="$WORK/tiny.jpgpack.npz"  # a tiny JPEG tree (random 32x32 images, 10 classes) packed here
    $PY - "$WORK/tinyjpg" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 40), ("test", 8)):
    for c in range(10):
        d = Path(sys.argv[1]) / split / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
EOF
    $PY scripts/pack_jpeg_bytes.py pack "$WORK/tinyjpg" "$PACK" 2>&1 | tail -1 | tee -a "$LOG"
  fi
  if [ -f "$PACK" ]; then
    say "data: decoding $PACK to $DATA"
    timeout 150 $PY scripts/pack_jpeg_bytes.py unpack "$PACK" "$DATA" --workers "$(nproc)" 2>&1 | tail -2 | tee -a "$LOG"
  fi
fi
[ -f "$DATA" ] && say "data: $DATA ($(du -h "$DATA" | cut -f1))" || say "data: none ($PACK not carried)"
REAL=(); [ -f "$DATA" ] && REAL=(--real-data "$DATA")
inductor_cache() { du -sh "/tmp/torchinductor_$(id -un)" 2>/dev/null | cut -f1 || echo none; }

# -- shared: N concurrent trainings, time-sliced and under MPS
if has shared; then
  say "shared: inductor cache before: $(inductor_cache)"
  run_stage shared 330 $PY benchmarks/bench_shared_gpu.py --device "$DEVICE" --model "$MODEL" --width "$WIDTH" \
      --batch-size "$BATCH" "${REAL[@]}" --sharing timeslice,mps --procs "$SHARED_PROCS" --seconds "$SHARED_S" \
      --workdir "$WORK/shared-mps" --out "$OUT/shared.json" > "$WORK/shared.out"
  # the table is the stdout after the last blank line's start: everything from "device " on
  sed -n '/^device /,$p' "$WORK/shared.out" > "$OUT/shared.md"; cat "$OUT/shared.md" | tee -a "$LOG"
  [ -f "$OUT/shared.json" ] && cp "$OUT/shared.json" "$WORK/shared.json"
  say "shared: inductor cache after: $(inductor_cache)"
  # a daemon left by a killed run would serve the next stage's processes: quit it
  pipe="$WORK/shared-mps/mps/pipe"
  if [ -S "$pipe/control" ]; then
    echo quit | CUDA_MPS_PIPE_DIRECTORY="$pipe" CUDA_MPS_LOG_DIRECTORY="$WORK/shared-mps/mps/log" \
        timeout 15 nvidia-cuda-mps-control >/dev/null 2>&1; say "shared: quit a leftover MPS daemon"
  fi
fi

# -- step (item 3): the bigger models' step, with the profile
if has step; then
  : > "$OUT/step.md"
  step_args=(--no-random); [ -f "$DATA" ] || step_args=()
  for spec in $STEP_SPECS; do
    IFS=: read -r m w b <<< "$spec"
    echo "## $m width $w, batch $b" >> "$OUT/step.md"
    run_stage "step $m-$w b$b" "$STEP_MAX" $PY benchmarks/bench_train.py --device "$DEVICE" --model "$m" --width "$w" \
        --batch-size "$b" --steps "$STEP_STEPS" --modes none,xnor,bonn,bonn-c --exec "$STEP_EXEC" \
        --profile "$PROFILE" --profile-exec "$STEP_EXEC" "${REAL[@]}" "${step_args[@]}" >> "$OUT/step.md"
    echo >> "$OUT/step.md"
  done
  grep -E "^\| (real|random) |^\[profile\].*kernels/step|^device:" "$OUT/step.md" | tee -a "$LOG"
fi

# -- multi: several trials in one process (another developer's script)
if has multi; then
  if [ -f benchmarks/bench_multi_trial.py ]; then
    run_stage multi 120 $PY benchmarks/bench_multi_trial.py --device "$DEVICE" $MULTI_ARGS --out "$OUT/multi.json"
  else
    say "multi: skipped (benchmarks/bench_multi_trial.py does not exist in this commit)"
  fi
fi

# -- service: the same measure through the stack (ray/optuna/mlflow from carried wheels)
if has service; then
  if ! $PY -c "import ray, optuna, mlflow" 2>/dev/null && [ -d .data/wheels ]; then
    say "service: installing the carried wheels into /tmp/pylib"
    timeout 180 $PY -m pip install -q --no-index --find-links .data/wheels --target /tmp/pylib \
        "ray[tune,default]==2.60.0" optuna==5.0.0 mlflow==3.17.2 2>&1 | tail -3 | tee -a "$LOG"
  fi
  if ! $PY -c "import ray, optuna, mlflow" 2>/dev/null; then
    say "service: skipped (ray/optuna/mlflow missing: carry .data/wheels)"
  elif [ "$DEVICE" != cpu ] && [ ! -f "$DATA" ]; then
    say "service: skipped (no $DATA: run it on the warm machine after a call that decoded the data)"
  else
    n="${SERVICE_N:-}"
    for f in "$OUT/shared.json" "$WORK/shared.json"; do
      [ -z "$n" ] && [ -f "$f" ] && n=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['best']['overall']['procs'])" "$f" 2>/dev/null)
    done
    n="${n:-4}"
    if [ "$DEVICE" = cpu ]; then svc=(--device cpu $SVC_ARGS); say "service: CPU dry run ($SVC_ARGS)"
    else svc=(--device cuda --data-root "$DATA" --procs "$( [ "$n" = 1 ] && echo 1 || echo "1,$n")" --epochs "${SERVICE_EPOCHS:-3}")
      say "service: N = 1 and $n"
    fi
    run_stage service 400 $PY benchmarks/bench_shared_gpu_service.py "${svc[@]}" --sharing mps,timeslice \
        --home "$WORK/svc" --out "$OUT/service.json" > "$WORK/service.out"
    sed -n '/^service path: /,$p' "$WORK/service.out" > "$OUT/service.md"; cat "$OUT/service.md" | tee -a "$LOG"
    # stacks left by a killed run: stop exactly them (never `ray stop`)
    $PY -c "
import sys
from service.launch.stack import stop_stack
for m in ('timeslice', 'mps'):
    s = stop_stack(sys.argv[1] + '/' + m, quiet=True)
    if s: print('stopped leftovers of', m, s)" "$WORK/svc" 2>&1 | tee -a "$LOG"
  fi
fi
say "done"
