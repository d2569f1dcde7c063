"""Several small trainings sharing one device: aggregate training images/s of N concurrent processes.

This is what a sweep with fractional GPUs does (`resources.gpus_per_trial: 1/N` packs N trials on a
card); the StudySpec's advice on fractional GPUs rests on this measurement. Each process builds the same
model and the same `trainables.train.Trainer` step as `fit` (BONN: kernel and feature loss on; on CUDA
the product's default step: fused BONN layers with compiled math, the step captured as a CUDA graph),
on one random batch or, with ``--real-data NPZ``, on the real pipeline of `fit` (`DeviceData`, per-epoch
permutation, crop+flip, normalisation). It warms up (compile, capture), waits at a barrier, then trains
for a fixed wall-clock window; images/s of all processes inside the common window are summed.

Sharing modes (``--sharing``): ``timeslice`` (plain CUDA processes: the driver time-slices them, kernels
of different processes never overlap) and ``mps`` (the same processes as clients of an NVIDIA MPS daemon
of our own, `service.launch.gpu.running_mps`: their kernels run concurrently). If the daemon cannot
start, the table says why in one line instead of a figure, and the other rows go on.

``--out FILE.json`` is rewritten after every row (a run killed at its limit leaves the finished rows):
per row the aggregate and per-process images/s, the warm-up seconds (compile + capture; a cold
torch.compile cache shows in the first row only), whether each step ran as a captured CUDA graph, and
GPU memory per process (torch.cuda.max_memory_allocated / reserved, and the device's free memory from
cudaMemGetInfo at the end of the window: no nvidia-smi needed).

    python benchmarks/bench_shared_gpu.py --device cuda --model wrn22 --width 16 --batch-size 128 \
        --real-data /tmp/cifar10.npz --sharing timeslice,mps --procs 1,2,4,8,16 --out shared.json
    python benchmarks/bench_shared_gpu.py --device cpu --model small_cnn --batch-size 64 --procs 1,2 --seconds 3
    # CPU with the MPS rows (stand-in driver programs):
    PATH=tests/fakes:$PATH FAKE_GPUS=1 python benchmarks/bench_shared_gpu.py --device cpu --model small_cnn \
        --batch-size 64 --procs 1,2 --seconds 3 --sharing timeslice,mps
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from service.launch.gpu import MpsError, running_mps  # noqa: E402  (standard library only)

SHARINGS = ("timeslice", "mps")
MIB = 2 ** 20


def _worker(rank: int, args: dict, barrier, results) -> None:
    import torch

    from trainables.config import TrainConfig
    from trainables.data import DeviceData
    from trainables.models import build_model
    from trainables.train import Trainer, resolve_runtime

    t_start = time.perf_counter()
    if args["device"] == "cpu":
        torch.set_num_threads(1)
    base = dict(model=args["model"], width=args["width"], batch_size=args["batch_size"], binarize=args["binarize"],
                compile=args["compile"], device=args["device"], lam=1e-4, theta=1e-3, feature_loss_start_epoch=0,
                epochs=1, seed=rank)
    if args["cuda_graph"] != "auto":
        base["cuda_graph"] = args["cuda_graph"] == "true"
    if args["real_data"]:
        base.update(dataset="npz", data_root=args["real_data"])
    cfg = TrainConfig.from_dict(base)
    device, amp, cl = resolve_runtime(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # the host's cores shared by the N processes (data loading, compiling, launching)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args["procs_now"]))
    if args["real_data"]:
        data = DeviceData.from_config(cfg, device)
        in_ch, size, ncls = data.in_channels, data.image_size, data.num_classes
        gen = torch.Generator(device=device)
        gen.manual_seed(rank)

        def batches():
            while True:
                yield from data.train_batches(cfg.batch_size, gen)
    else:
        in_ch, size, ncls = args["in_channels"], args["image_size"], 10
        x = torch.randn(cfg.batch_size, in_ch, size, size, device=device)
        y = torch.randint(0, ncls, (cfg.batch_size,), device=device)

        def batches():
            while True:
                yield x, y
    model = build_model(cfg, in_ch, ncls, size)
    trainer = Trainer(cfg, model, ncls, device, steps_per_epoch=1000, amp=amp, channels_last=cl, log=None)
    trainer.set_epoch(0)  # feature loss on from the first step
    it = batches()
    # a captured step needs captured.warmup eager steps and the capture before it replays
    for _ in range(max(args["warmup"], trainer.captured.warmup + 3 if trainer.use_graph else 0)):
        trainer.train_step(*next(it))
    trainer.read_sums()  # sync
    warmup_s = time.perf_counter() - t_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    barrier.wait(timeout=args["barrier_timeout"])
    wall0 = time.time()
    t0 = time.perf_counter()
    t_end = t0 + args["seconds"]
    steps = 0
    while time.perf_counter() < t_end:
        trainer.train_step(*next(it))
        steps += 1
        if steps % args["sync_every"] == 0:
            trainer.read_sums()  # bound the queue so the window is honest
    sums = trainer.read_sums()
    dt = time.perf_counter() - t0
    rec = {"rank": rank, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "images_per_s": steps * cfg.batch_size / dt, "steps": steps, "window_s": dt,
           "t0": wall0, "t1": wall0 + dt, "warmup_s": warmup_s, "graph": bool(trainer.use_graph),
           "graph_failed": trainer.captured.failed, "fused": bool(trainer.fused),
           "compiled_math": bool(trainer.compile_math), "finite": all(v == v for v in sums.values())}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rec.update(max_allocated_mib=torch.cuda.max_memory_allocated(device) / MIB,
                   max_reserved_mib=torch.cuda.max_memory_reserved(device) / MIB,
                   device_used_mib=(total - free) / MIB, device_total_mib=total / MIB)
    results[rank] = rec


def run(n: int, args: dict) -> list[dict]:
    """N processes, each one training; their records by rank. RuntimeError if one fails (the others are
    ended: a barrier never waits for a dead process)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    with ctx.Manager() as mgr:
        results = mgr.dict()
        procs = [ctx.Process(target=_worker, args=(r, args, barrier, results)) for r in range(n)]
        try:
            for p in procs:
                p.start()
            while any(p.is_alive() for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} of {n} processes failed (exit codes {bad})")
        return [dict(results[r]) for r in range(n)]


def summarize(sharing: str, n: int, recs: list[dict]) -> dict:
    per = [r["images_per_s"] for r in recs]
    row = {"sharing": sharing, "procs": n, "aggregate": sum(per), "per_proc": per,
           "per_proc_mean": sum(per) / n, "warmup_s_max": max(r["warmup_s"] for r in recs),
           "graph": all(r["graph"] for r in recs), "graph_failed": next((r["graph_failed"] for r in recs
                                                                        if r["graph_failed"]), None),
           "compiled_math": all(r["compiled_math"] for r in recs), "finite": all(r["finite"] for r in recs),
           # spread of the window ends: a straggler ran part of its window with fewer neighbours
           "end_spread_s": max(r["t1"] for r in recs) - min(r["t1"] for r in recs), "processes": recs}
    if "max_allocated_mib" in recs[0]:
        row["max_allocated_mib_per_proc"] = max(r["max_allocated_mib"] for r in recs)
        row["max_reserved_mib_per_proc"] = max(r["max_reserved_mib"] for r in recs)
        row["device_used_mib"] = max(r["device_used_mib"] for r in recs)
        row["device_total_mib"] = recs[0]["device_total_mib"]
    return row


def best_rows(rows: list[dict]) -> dict:
    """Per sharing mode the N with the highest aggregate; ``overall``: the best row of all."""
    best: dict = {}
    for r in rows:
        if r.get("aggregate") is None:
            continue
        if r["sharing"] not in best or r["aggregate"] > best[r["sharing"]]["aggregate"]:
            best[r["sharing"]] = {"procs": r["procs"], "aggregate": r["aggregate"]}
    if best:
        s, b = max(best.items(), key=lambda kv: kv[1]["aggregate"])
        best["overall"] = {"sharing": s, **b}
    return best


def table(meta: dict, rows: list[dict]) -> str:
    base = {r["sharing"]: r["aggregate"] for r in rows if r["procs"] == 1 and r.get("aggregate")}
    base1 = base.get("timeslice") or next(iter(base.values()), None)
    lines = [f"device {meta['device_name']}, torch {meta['torch']}, {meta['model']} width {meta['width']}, "
             f"binarize {meta['binarize']}, batch {meta['batch_size']}, data {meta['data']}, "
             f"{meta['seconds']:g} s window, step: {meta['step']}", "",
             "| sharing | concurrent trainings | aggregate images/s | per training | vs 1 | GPU MiB per process "
             "(max allocated / reserved) | warm-up s (max) |", "|---|---|---|---|---|---|---|"]
    order = {s: i for i, s in enumerate(SHARINGS)}
    for r in sorted(rows, key=lambda r: (order.get(r["sharing"], 9), r["procs"] if isinstance(r["procs"], int) else 0)):
        if r.get("aggregate") is None:
            lines.append(f"| {r['sharing']} | {r['procs']} | not measured: {r['error']} | | | | |")
            continue
        vs = r["aggregate"] / (base.get(r["sharing"]) or base1) if (base.get(r["sharing"]) or base1) else None
        mem = (f"{r['max_allocated_mib_per_proc']:.0f} / {r['max_reserved_mib_per_proc']:.0f}"
               if "max_allocated_mib_per_proc" in r else "-")
        note = "" if r["graph"] or meta["device"] == "cpu" else " (not captured: eager steps)"
        lines.append(f"| {r['sharing']} | {r['procs']} | {r['aggregate']:.0f}{note} | {r['per_proc_mean']:.0f} | "
                     f"{f'{vs:.2f}x' if vs else '-'} | {mem} | {r['warmup_s_max']:.1f} |")
    best = best_rows(rows)
    lines.append("")
    for s in SHARINGS:
        if s in best:
            lines.append(f"best N with {s}: {best[s]['procs']} ({best[s]['aggregate']:.0f} images/s)")
    return "\n".join(lines)


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(p)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An error as one table cell: its lines joined (an MPS error's log tail holds the reason)."""
    return " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:limit].replace("|", "/")


def _on_term(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds: children terminated, the MPS daemon quit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="wrn22")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--binarize", default="bonn", choices=["bonn", "xnor", "none"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32, help="random data only")
    ap.add_argument("--in-channels", type=int, default=3, help="random data only")
    ap.add_argument("--real-data", default=None, metavar="NPZ", help="train on this .npz through DeviceData")
    ap.add_argument("--procs", default="1,2,4,8,16")
    ap.add_argument("--sharing", default="timeslice,mps", help="of " + ", ".join(SHARINGS))
    ap.add_argument("--seconds", type=float, default=15.0, help="timed window per row")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (at least the capture's)")
    ap.add_argument("--sync-every", type=int, default=10, help="host sync every this many steps")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the model (not the default)")
    ap.add_argument("--cuda-graph", default="auto", choices=["auto", "true", "false"],
                    help="auto: the product's default (captured on CUDA)")
    ap.add_argument("--workdir", default=None, help="the MPS daemon's folder (default: a fresh one under /tmp)")
    ap.add_argument("--barrier-timeout", type=float, default=900.0, help="seconds to wait for every warm-up")
    ap.add_argument("--out", default=None, metavar="FILE.json", help="rewritten after every row")
    args = vars(ap.parse_args(argv))
    procs = [int(v) for v in args["procs"].split(",") if v]
    sharings = [s for s in args["sharing"].split(",") if s]
    bad = [s for s in sharings if s not in SHARINGS]
    if bad:
        ap.error(f"--sharing: {bad} not of {list(SHARINGS)}")
    if args["real_data"] and not Path(args["real_data"]).is_file():
        ap.error(f"--real-data: no file {args['real_data']}")
    signal.signal(signal.SIGTERM, _on_term)
    import torch

    cuda = args["device"] == "cuda"
    meta = {k: args[k] for k in ("device", "model", "width", "binarize", "batch_size", "seconds", "warmup",
                                 "compile", "cuda_graph")}
    meta.update(device_name="cuda (no row finished)" if cuda else "cpu", torch=torch.__version__,
                data=f"real ({args['real_data']})" if args["real_data"] else "one random batch",
                step=("fused compiled math + CUDA graph (TrainConfig defaults)" if cuda and args["cuda_graph"] != "false"
                      else "eager"), command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                      time.gmtime()))
    workdir = args["workdir"] or tempfile.mkdtemp(prefix="bsshared-")
    rows: list[dict] = []
    doc = {"meta": meta, "rows": rows, "best": {}}

    def record(row: dict) -> None:
        rows.append(row)
        doc["best"] = best_rows(rows)
        write_json(args["out"], doc)
        agg = f"{row['aggregate']:.0f} images/s aggregate" if row.get("aggregate") is not None else row["error"]
        print(f"[shared] {row['sharing']} {row['procs']} procs: {agg}", file=sys.stderr, flush=True)

    def row(sharing: str, n: int) -> None:
        try:
            recs = run(n, {**args, "procs_now": n})
            meta["device_name"] = recs[0]["device_name"]
            record(summarize(sharing, n, recs))
        except RuntimeError as exc:  # a process failed (out of memory, say): the row says so, go on
            record({"sharing": sharing, "procs": n, "error": one_line(exc)})

    write_json(args["out"], doc)
    mps_broken = False
    # N by N, both sharing modes at each N: a run cut off at its limit still leaves comparable rows. The
    # MPS daemon is started per row and quit after it, so no MPS server is on the card in time-sliced rows.
    for n in procs:
        for sharing in sharings:
            if sharing == "timeslice":
                row(sharing, n)
                continue
            if mps_broken:
                continue
            try:
                with running_mps(workdir, need_gpus=cuda) as mps:
                    meta["mps_pipe_dir"] = mps.pipe_dir
                    row(sharing, n)
            except MpsError as exc:  # the daemon cannot start: one row says why, no more tries
                mps_broken = True
                record({"sharing": sharing, "procs": "-", "error": one_line(exc)})
    print()
    print(table(meta, rows))
    write_json(args["out"], doc)
    return 0 if any(r.get("aggregate") is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
