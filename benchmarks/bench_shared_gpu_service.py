"""N trials sharing one GPU through the real service path: aggregate training images/s as a study sees it.

The same measure as benchmarks/bench_shared_gpu.py (N concurrent trainings of one model on one card,
time-sliced or under MPS), but as the product runs it: ``start_stack(home, num_gpus=1, mps=<flag>)`` --
what ``bonn-sweep up --gpus 1 [--mps]`` starts: the Ray head offers the GPU, and with MPS the stack's
own daemon makes every Ray worker (every trial) its client -- then one StudySpec POSTed over HTTP to
the stack's API with ``num_trials = max_concurrent_trials = N``, ``gpus_per_trial: 1/N``, FIFO (no
early stopping), a fixed number of epochs, the lambda of the kernel loss drawn per trial (no effect on
the cost of a step), checkpoints kept last-only and not uploaded. The head node is used, not an extra
GPU worker node (service.launch.ray_cluster.start_ray_worker): since ``--gpus``/``--mps`` exist that is
the documented path, and the head's processes are the ones the stack starts as MPS clients.

Per study it reads every trial's own per-epoch ``images_per_s`` and ``epoch_time_s`` from MLflow (the
runs named by the API's ``/studies/{id}/trials``; REST ``metrics/get-history``) and reports:

* ``steady``: the sum over trials of each trial's median images/s over epochs 2.. (epoch 1 holds the
  compile and the CUDA-graph capture); valid as an aggregate when the trials' steady epochs overlap in
  time: ``overlap`` = common part / union of the trials' windows (first result to last result);
* ``span``: N x epochs x training images / (last trial's end - first trial's start, from Optuna);
* ``wall``: the same images / the study's wall time from POST to its terminal state.

Writes ``--out`` JSON after every row and prints a markdown table. The stack it started is stopped
(``stop_stack``) whatever happens, SIGTERM included.

    # GPU (ray, optuna, mlflow importable; data decoded to /tmp/cifar10.npz):
    python benchmarks/bench_shared_gpu_service.py --device cuda --data-root /tmp/cifar10.npz --procs 1,4 \
        --sharing timeslice,mps --epochs 4 --out service.json
    # CPU dry run (digits, small CNN; the MPS row with the stand-in driver programs on PATH):
    PATH=tests/fakes:$PATH FAKE_GPUS=1 python benchmarks/bench_shared_gpu_service.py --device cpu \
        --procs 2 --epochs 2 --sharing timeslice,mps --out /tmp/service.json
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_shared_gpu import best_rows, one_line, write_json  # noqa: E402

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}


class Api:
    """The stack's API (bearer key) and MLflow server, over urllib (no httpx needed)."""

    def __init__(self, api_url: str, key: str | None, mlflow_url: str) -> None:
        self.api_url, self.key, self.mlflow_url = api_url, key, mlflow_url

    def _call(self, url: str, body: dict | None = None, auth: bool = True) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if auth and self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, {"detail": e.read().decode(errors="replace")[:2000]}

    def get(self, path: str) -> dict:
        code, data = self._call(self.api_url + path)
        if code != 200:
            raise RuntimeError(f"GET {path} -> {code}: {data}")
        return data

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self._call(self.api_url + path, body)

    def history(self, run_id: str, key: str) -> list[dict]:
        q = urllib.parse.urlencode({"run_id": run_id, "metric_key": key})
        code, data = self._call(f"{self.mlflow_url}/api/2.0/mlflow/metrics/get-history?{q}", auth=False)
        if code != 200:
            raise RuntimeError(f"MLflow get-history {key} of {run_id} -> {code}")
        return sorted(data.get("metrics", []), key=lambda m: m["step"])


def spec_for(a: argparse.Namespace, n: int, sharing: str) -> dict:
    base = {"model": a.model, "dataset": a.dataset, "epochs": a.epochs, "batch_size": a.batch_size,
            "device": a.device, "feature_loss_start_epoch": 0, "hist_epochs": []}
    if a.model in ("wrn22", "resnet18", "small_cnn"):
        base["width"] = a.width
    if a.data_root:
        base["data_root"] = str(Path(a.data_root).resolve())
    gpus = 0.0 if a.device == "cpu" else 1.0 / n
    return {
        "name": f"fill-{sharing}-{n}",
        "search_space": {"name": "fill-bench", "parameters": {"lam": {"type": "float", "low": 5e-5, "high": 2e-4,
                                                                     "log": True}},
                         "fixed": {"binarize": "bonn", "theta": 1e-3, "nu": 1e-4}},
        "base": base,
        "objective": {"metric": "val_acc", "mode": "max", "selection": "last"},
        "sampler": {"type": "random", "seed": 0},
        "scheduler": {"type": "fifo"},
        "budget": {"num_trials": n, "max_concurrent_trials": n, "max_failed_trials": n},
        "resources": {"cpus_per_trial": a.cpus_per_trial or max(0.25, round((a.cpus - 2) / n, 2)),
                      "gpus_per_trial": gpus},
        "checkpoints": {"keep": "last", "upload": "none"},
    }


def train_images_per_epoch(a: argparse.Namespace) -> int:
    """Training images of one epoch as fit() sees them: full batches of the training split."""
    from trainables.config import TrainConfig
    from trainables.data import load_host_data, stratified_split

    cfg = TrainConfig.from_dict({"dataset": a.dataset, "batch_size": a.batch_size, "device": "cpu",
                                 **({"data_root": a.data_root} if a.data_root else {})})
    keep, _ = stratified_split(load_host_data(cfg).y_train, cfg.val_fraction, cfg.seed)
    bs = min(cfg.batch_size, len(keep))
    return max(1, len(keep) // bs) * bs


def _ts(s: str | None) -> float | None:
    from datetime import datetime

    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() if s else None


def collect(api: Api, sid: str, wait_s: float = 30.0) -> list[dict]:
    """Every trial's state, times and per-epoch images/s (MLflow), once each names its MLflow run."""
    deadline = time.monotonic() + wait_s
    while True:
        trials = api.get(f"/studies/{sid}/trials")["data"]
        if all(t.get("mlflow_run_id") for t in trials) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    out = []
    for t in trials:
        rec = {"number": t["number"], "state": t["state"], "start": _ts(t.get("datetime_start")),
               "end": _ts(t.get("datetime_complete")), "mlflow_run_id": t.get("mlflow_run_id"),
               "error": t.get("error")}
        if rec["mlflow_run_id"]:
            ips = api.history(rec["mlflow_run_id"], "images_per_s")
            rec["images_per_s"] = [m["value"] for m in ips]
            rec["result_ts"] = [m["timestamp"] / 1e3 for m in ips]
            rec["epoch_time_s"] = [m["value"] for m in api.history(rec["mlflow_run_id"], "epoch_time_s")]
        out.append(rec)
    return out


def summarize(sharing: str, n: int, trials: list[dict], wall_s: float, status: str, imgs: int,
              epochs: int) -> dict:
    row = {"sharing": sharing, "procs": n, "status": status, "wall_s": wall_s, "trials": trials,
           "images_per_epoch": imgs, "epochs": epochs}
    done = [t for t in trials if t.get("images_per_s")]
    if len(done) < n:
        row["error"] = (f"{status}: {len(done)} of {n} trials reported images/s"
                        + next((f"; {t['error']}" for t in trials if t.get("error")), ""))
    if not done:
        return row
    steady = [statistics.median(t["images_per_s"][1:] or t["images_per_s"]) for t in done]
    row["steady_per_trial"] = steady
    row["steady"] = sum(steady)
    row["first_epoch_per_trial"] = [t["images_per_s"][0] for t in done]
    # the trials' steady windows: from their first result to their last (MLflow timestamps)
    lo = [t["result_ts"][0] for t in done]
    hi = [t["result_ts"][-1] for t in done]
    union = max(hi) - min(lo)
    row["overlap"] = max(0.0, min(hi) - max(lo)) / union if union > 0 else 1.0
    total = sum(len(t["images_per_s"]) for t in done) * imgs
    starts = [t["start"] for t in trials if t.get("start")]
    ends = [t["end"] for t in trials if t.get("end")]
    if starts and ends and max(ends) > min(starts):
        row["span_s"] = max(ends) - min(starts)
        row["span"] = total / row["span_s"]
    row["wall"] = total / wall_s
    return row


def run_study(api: Api, a: argparse.Namespace, n: int, sharing: str, imgs: int, say) -> dict:
    t0 = time.monotonic()
    code, body = api.post("/studies", spec_for(a, n, sharing))
    if code != 201:
        return {"sharing": sharing, "procs": n, "error": f"POST /studies -> {code}: {str(body)[:300]}"}
    sid = body["id"]
    say(f"{sharing} N={n}: study {sid} created")
    cancelled = False
    while True:
        study = api.get(f"/studies/{sid}")
        if study["status"] in TERMINAL:
            break
        if not cancelled and time.monotonic() - t0 > a.limit_s:
            say(f"{sharing} N={n}: time limit {a.limit_s:.0f}s, cancelling")
            api.post(f"/studies/{sid}/cancel", {})
            cancelled = True
        time.sleep(a.poll_s)
    wall = time.monotonic() - t0
    c = study["trial_counts"]
    say(f"{sharing} N={n}: {study['status']} in {wall:.0f}s ({c['complete']} complete, {c['failed']} failed)")
    row = summarize(sharing, n, collect(api, sid), wall, study["status"], imgs, a.epochs)
    row["study_id"] = sid
    return row


def table(meta: dict, rows: list[dict]) -> str:
    lines = [f"service path: {meta['device_name']}, {meta['model']} width {meta['width']}, batch {meta['batch_size']}, "
             f"dataset {meta['dataset']}, {meta['epochs']} epochs per trial, {meta['images_per_epoch']} training "
             "images per epoch", "",
             "| sharing | concurrent trials | steady images/s (sum of trials) | per trial | overlap | "
             "span images/s | study-wall images/s | epoch-1 images/s per trial | study s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("steady") is None:
            lines.append(f"| {r['sharing']} | {r['procs']} | not measured: {r.get('error')} | | | | | | |")
            continue
        first = statistics.mean(r["first_epoch_per_trial"])
        lines.append(f"| {r['sharing']} | {r['procs']} | {r['steady']:.0f} | {r['steady'] / len(r['steady_per_trial']):.0f}"
                     f" | {r['overlap']:.2f} | {r.get('span', float('nan')):.0f} | {r['wall']:.0f} | {first:.0f} | "
                     f"{r['wall_s']:.0f} |" + (f" {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def _on_term(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through stop_stack


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="default: wrn22 on CUDA, small_cnn on CPU")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 64 on CPU")
    ap.add_argument("--dataset", default=None, help="default: npz with --data-root, else digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--procs", default="1,4", help="concurrent trials per row")
    ap.add_argument("--sharing", default="timeslice,mps")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs the Ray head offers")
    ap.add_argument("--cpus-per-trial", type=float, default=None, help="default: (cpus - 2) / N")
    ap.add_argument("--home", default=None, help="stack homes go under it (default /tmp/bsfill)")
    ap.add_argument("--limit-s", type=float, default=240.0, help="per study; then it is cancelled")
    ap.add_argument("--poll-s", type=float, default=2.0)
    ap.add_argument("--out", default=None, metavar="FILE.json")
    a = ap.parse_args(argv)
    a.model = a.model or ("wrn22" if a.device == "cuda" else "small_cnn")
    a.batch_size = a.batch_size or (128 if a.device == "cuda" else 64)
    a.dataset = a.dataset or ("npz" if a.data_root else "digits")
    procs = [int(v) for v in a.procs.split(",") if v]
    sharings = [s for s in a.sharing.split(",") if s]
    signal.signal(signal.SIGTERM, _on_term)

    from service.launch.processes import StackError
    from service.launch.stack import start_stack, stop_stack

    root = Path(a.home or "/tmp/bsfill")
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    imgs = train_images_per_epoch(a)
    device_name = "cpu"
    if a.device == "cuda":  # from nvidia-smi: this process keeps no CUDA context beside the trials
        try:
            device_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip() or "cuda"
        except (OSError, subprocess.TimeoutExpired):
            device_name = "cuda"
    meta = {"device": a.device, "device_name": device_name, "model": a.model, "width": a.width,
            "batch_size": a.batch_size, "dataset": a.dataset, "data_root": a.data_root, "epochs": a.epochs,
            "images_per_epoch": imgs, "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    rows: list[dict] = []
    doc = {"meta": meta, "rows": rows}

    def record(row: dict) -> None:
        rows.append(row)
        doc["best"] = best_rows([{**r, "aggregate": r.get("steady")} for r in rows])
        write_json(a.out, doc)

    data_dirs = [str(root)] + ([str(Path(a.data_root).resolve().parent)] if a.data_root else [])
    env = {"BONN_SWEEP_DATA_DIRS": os.pathsep.join(data_dirs)}
    os.environ.update(env)
    for sharing in sharings:
        home = root / sharing
        try:
            try:
                stack = start_stack(home, num_cpus=a.cpus, with_api=True, extra_env=env, log=say,
                                    with_optuna_dashboard=False, num_gpus=1 if (a.device == "cuda" or sharing == "mps") else 0,
                                    mps=sharing == "mps")
            except StackError as exc:
                record({"sharing": sharing, "procs": "-", "error": one_line(exc)})
                say(f"{sharing}: stack not started: {one_line(exc)}")
                continue
            say(f"{sharing}: stack up ({stack.timings.get('total_s')}s; GPUs offered {stack.num_gpus}, "
                f"MPS {'on' if stack.mps_dirs else 'off'})")
            api = Api(stack.api_url, stack.api_key, stack.mlflow_uri)
            for n in procs:
                try:
                    record(run_study(api, a, n, sharing, imgs, say))
                except (RuntimeError, OSError) as exc:
                    record({"sharing": sharing, "procs": n, "error": one_line(exc)})
                print(table(meta, rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        finally:
            stop_stack(home, quiet=True)
            say(f"{sharing}: stack stopped")
    print()
    print(table(meta, rows))
    write_json(a.out, doc)
    return 0 if any(r.get("steady") is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
