"""The headline study through the real service path: the embedded stack (Ray head, MLflow server, the
API), plus a Ray worker node that holds the GPU(s), then one StudySpec POSTed over HTTP -- WRN-22-16 on
CIFAR-10 (the JPEG copy, packed as .npz), the ``bonn-paper`` space, ASHA, the same epoch budget for every
trial and the paper's warm start, then the confirmation over seeds -- watched until it ends.

Everything it learns goes under ``--out`` as soon as it exists (a device call cut off at its limit still
returns it): ``progress.log`` (one line per poll), ``study.json`` (``GET /studies/{id}``, with the
``confirmation`` object), ``trials.json``, and at the end ``results.md`` (the table for
benchmarks/RESULTS.md), ``driver.log`` (the Ray job's log) and ``confirmation.png`` (the parent run's
comparison plot). At ``--limit-s`` the study is cancelled (Tune saves its state) and the partial
results are written.

CPU dry run (digits, tiny budget; the same code path)::

    python benchmarks/headline_study.py --out /tmp/headline --dataset digits --model small_cnn \
        --trials 3 --epochs 2 --seeds 2 --grace 1 --concurrent 2 --worker-gpus 0 --gpus-per-trial 0
"""

from __future__ import annotations

import argparse
import json

import yaml
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED"}


def spec_for(a: argparse.Namespace) -> dict:
    base = {"model": a.model, "dataset": a.dataset, "epochs": a.epochs, "batch_size": a.batch_size}
    if a.model == "wrn22":
        base["width"] = a.width
    if a.data_root:
        base["data_root"] = str(Path(a.data_root).resolve())
    if a.device:
        base["device"] = a.device
    for item in a.set or []:  # --set key=value: any trial-config key for every trial (YAML scalars)
        key, _, raw = item.partition("=")
        base[key] = yaml.safe_load(raw)
    space: str | dict = a.space
    if a.space.endswith((".yaml", ".yml", ".json")):  # a space file, sent inline (the API reads no file)
        space = yaml.safe_load(Path(a.space).read_text())
    return {
        "name": a.name,
        "search_space": space,
        "base": base,
        "objective": {"metric": "val_acc", "mode": "max", "selection": "last"},
        "sampler": {"type": "tpe", "seed": 0},
        "scheduler": {"type": "asha", "grace_period": a.grace, "reduction_factor": 3},
        "budget": {"num_trials": a.trials, "max_concurrent_trials": a.concurrent, "max_failed_trials": a.trials},
        "resources": {"cpus_per_trial": a.cpus_per_trial, "gpus_per_trial": a.gpus_per_trial},
        "confirm": {"seeds": a.seeds, "top_k": 1},
    }


def write(out: Path, name: str, obj) -> None:
    tmp = out / (name + ".tmp")
    tmp.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str))
    tmp.replace(out / name)


def results_md(study: dict, trials: list, wall_s: float, cmd: str) -> str:
    lines = [f"study {study['id']} {study['status']} after {wall_s:.0f} s wall; command: `{cmd}`", ""]
    c = study.get("trial_counts") or {}
    lines.append(f"search: {c.get('complete')} complete, {c.get('pruned')} pruned, {c.get('failed')} failed "
                 f"of {study['num_trials']}; best trial {(study.get('best_trial') or {}).get('number')} "
                 f"val_acc {(study.get('best_trial') or {}).get('value')}")
    conf = study.get("confirmation")
    if conf:
        lines += ["", f"confirmation over seeds {conf['seeds']} at {conf['epochs']} epochs "
                      f"({conf['runs_done']}/{conf['runs_total']} runs):", "",
                  "| configuration | role | val_acc per seed | val_acc mean ± std | test_acc per seed | test_acc mean ± std |",
                  "|---|---|---|---|---|---|"]
        for k in conf["configurations"]:
            def pm(s):
                return "" if s["mean"] is None else f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["std"] is not None else "")
            def seeds(m):
                return " ".join(f"{r[m]:.4f}" for r in k["runs"] if r.get(m) is not None)
            lines.append(f"| {k['label']} | {k['role']} | {seeds('val_acc')} | {pm(k['val_acc'])} | "
                         f"{seeds('test_acc')} | {pm(k['test_acc'])} |")
        d = conf.get("difference") or {}
        if d.get("diff") is not None:
            ci = f"[{d['low']:+.4f}, {d['high']:+.4f}]" if d.get("low") is not None else "(no interval)"
            lines += ["", f"best ({conf['best']}) − reference, test accuracy: {d['diff'] * 100:+.2f} points, "
                          f"95% interval {ci} ({d['method']}); goal: >= +1 point"]
        best = next((k for k in conf["configurations"] if k["label"] == conf.get("best")), None)
        if best:
            lines += ["", "best params: " + json.dumps(best["params"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--home", default=None, help="stack home (default: <out>/../headline-home, or $WORK)")
    ap.add_argument("--name", default="headline-cifar10")
    ap.add_argument("--space", default="bonn-paper", help="a preset name, or a .yaml/.json space file (sent inline)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a trial-config key for every trial (the base), repeatable: --set lr=0.6")
    ap.add_argument("--dataset", default="npz")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--model", default="wrn22")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default=None)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--grace", type=int, default=3)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--cpus-per-trial", type=float, default=3.0)
    ap.add_argument("--gpus-per-trial", type=float, default=0.25)
    ap.add_argument("--head-cpus", type=int, default=2)
    ap.add_argument("--worker-cpus", type=int, default=12)
    ap.add_argument("--worker-gpus", type=float, default=1.0)
    ap.add_argument("--limit-s", type=float, default=520.0)
    ap.add_argument("--poll-s", type=float, default=5.0)
    a = ap.parse_args()

    import httpx

    from service.launch.ray_cluster import start_ray_worker
    from service.launch.stack import start_stack, stop_stack

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(a.home or os.environ.get("WORK", "/tmp")) / "headline-home"
    t0 = time.monotonic()
    log = open(out / "progress.log", "a", buffering=1)

    def say(msg: str) -> None:
        line = f"[{time.monotonic() - t0:7.1f}s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")

    data_dirs = [str(home)] + ([str(Path(a.data_root).resolve().parent)] if a.data_root else [])
    env = {"BONN_SWEEP_DATA_DIRS": os.pathsep.join(data_dirs), "BONN_SWEEP_CHECKPOINT_UPLOAD": "improved"}
    os.environ.update(env)
    # the head offers no GPU: the worker node below holds it (--worker-gpus)
    stack = start_stack(home, num_cpus=a.head_cpus, num_gpus=0, with_api=True, extra_env=env, log=say)
    rc = 1
    try:
        if a.worker_gpus > 0:
            start_ray_worker(stack, num_cpus=a.worker_cpus, num_gpus=a.worker_gpus, extra_env=env)
            say(f"GPU worker node up: {a.worker_cpus} CPUs, {a.worker_gpus:g} GPU(s)")
        api = httpx.Client(base_url=stack.api_url, timeout=60.0, headers={"Authorization": f"Bearer {stack.api_key}"})
        spec = spec_for(a)
        r = api.post("/studies", json=spec)
        if r.status_code != 201:
            say(f"POST /studies -> {r.status_code}: {r.text}")
            return 1
        sid = r.json()["id"]
        say(f"study {sid} created; limit {a.limit_s:.0f}s")
        cancelled = False
        while True:
            study = api.get(f"/studies/{sid}").json()
            trials = api.get(f"/studies/{sid}/trials").json()["data"]
            write(out, "study.json", study)
            write(out, "trials.json", trials)
            c, conf = study["trial_counts"], study.get("confirmation") or {}
            say(f"{study['status']}: trials {c['complete']} complete {c['pruned']} pruned {c['running']} running "
                f"{c['failed']} failed; confirmation {conf.get('runs_done', '-')}/{conf.get('runs_total', '-')}")
            if study["status"] in TERMINAL:
                break
            if not cancelled and time.monotonic() - t0 > a.limit_s:
                say("time limit: cancelling the study (Tune saves its state)")
                api.post(f"/studies/{sid}/cancel")
                cancelled = True
            time.sleep(a.poll_s)
        wall = time.monotonic() - t0
        cmd = " ".join(sys.argv)
        write(out, "results.md", results_md(study, trials, wall, cmd))
        try:
            logs = httpx.get(f"{stack.ray_dashboard_url}/api/jobs/{study['submission_id']}/logs", timeout=30).json()
            write(out, "driver.log", (logs.get("logs") or "")[-8_000_000:])
        except Exception as exc:  # noqa: BLE001
            say(f"driver log not fetched: {exc}")
        try:
            import mlflow

            p = mlflow.artifacts.download_artifacts(run_id=study["mlflow_parent_run_id"],
                                                    artifact_path="confirmation/confirmation.png",
                                                    tracking_uri=stack.mlflow_uri, dst_path=str(home / "dl"))
            (out / "confirmation.png").write_bytes(Path(p).read_bytes())
        except Exception as exc:  # noqa: BLE001
            say(f"confirmation plot not fetched: {exc}")
        say(f"done: {study['status']} in {wall:.0f}s")
        rc = 0 if study["status"] == "SUCCEEDED" else 2
    finally:
        stop_stack(home, quiet=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
