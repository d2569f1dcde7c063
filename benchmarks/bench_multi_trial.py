"""Training throughput of K BONN trials fused in one process vs one trial per process (docs/multi-trial.md).

Rows:

* ``single``: one trial as ``fit`` trains it, ``trainables.train.Trainer`` with ``fused_bonn`` and
  ``cuda_graph`` at ``--single-fused`` / ``auto`` (on CUDA: the fused, compiled BONN math and the step
  captured as a CUDA graph; on CPU: the eager reference path);
* ``K=k``: ``trainables.fast.multi_trial.MultiTrainer`` with k members of the same architecture that
  differ in seed, lam, theta and lr; on CUDA the whole fused step is captured as one CUDA graph
  (``trainables.fast.cuda_graph``; ``--no-graph``: eager).

Data: random normal images and labels generated once on the device (no input pipeline; every step
sees the same batch), so the numbers are the training step's throughput, not a full epoch's. The
BONN kernel loss and feature loss are both on. Columns: images/s per member (the rate each trial
trains at), member-images/s (k x that: the sweep's throughput on this device), the ratio of the latter
to ``single``, ms per step, peak device memory. A markdown table goes to stdout; ``--out FILE`` gets the
JSON of every row so far after each row. Imports neither ray, optuna, mlflow nor httpx.

    python benchmarks/bench_multi_trial.py --device cpu --model small_cnn --ks 1,2 --steps 3
    python benchmarks/bench_multi_trial.py --device cuda --model wrn22 --width 16 --ks 1,2,4,8,16 \\
        --steps 50 --out wrn22_16_multi.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainables.config import TrainConfig  # noqa: E402
from trainables.fast.multi_trial import MultiTrainer  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.train import Trainer, resolve_runtime  # noqa: E402

BANNED = ("ray", "optuna", "mlflow", "httpx")
LAMS, THETAS, LRS = (1e-4, 1e-3, 1e-5, 3e-4), (1e-3, 1e-2, 1e-4), (0.01, 0.02, 0.005, 0.05)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _member_cfgs(base: dict, k: int) -> list[TrainConfig]:
    return [TrainConfig.from_dict({**base, "seed": i, "lam": LAMS[i % len(LAMS)], "theta": THETAS[i % len(THETAS)],
                                   "lr": LRS[i % len(LRS)]}) for i in range(k)]


def _time(step, read, device, steps: int, warmup: int) -> float:
    """Seconds for ``steps`` calls of ``step()`` after ``warmup`` untimed ones (host-synced around)."""
    for _ in range(warmup):
        step()
    read()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    read()  # the host sync that ends the timed loop (as fit's once-per-epoch read)
    _sync(device)
    return time.perf_counter() - t0


def run_single(args, base, device, amp, cl, x, y) -> dict:
    cfg = _member_cfgs(base, 1)[0].replace(fused_bonn=args.single_fused, cuda_graph="auto")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, args.in_channels, args.num_classes, args.image_size)
    tr = Trainer(cfg, model, args.num_classes, device, steps_per_epoch=args.steps, amp=amp, channels_last=cl,
                 log=lambda m: print(m, file=sys.stderr))
    tr.set_epoch(0)
    dt = _time(lambda: tr.train_step(x, y), tr.read_sums, device, args.steps, args.warmup)
    finite = all(v == v for v in tr.read_sums().values())
    return {"row": "single", "members": 1, "graph": tr.use_graph, "fused_bonn": tr.fused,
            "compiled_math": tr.compile_math, "seconds": dt, "finite": [finite],
            "capture_failed": tr.captured.failed}


def run_multi(args, base, device, amp, cl, x, y, k: int) -> dict:
    cfgs = _member_cfgs(base, k)
    pack = MultiTrainer.build(cfgs, args.in_channels, args.num_classes, args.image_size, device=device,
                              steps_per_epoch=args.steps, amp=amp, channels_last=cl,
                              cuda_graph=not args.no_graph, log=lambda m: print(m, file=sys.stderr))
    pack.set_epoch(0)
    dt = _time(lambda: pack.train_step(x, y), pack.read_sums, device, args.steps, args.warmup)
    return {"row": f"K={k}", "members": k, "graph": pack.use_graph, "fused_bonn": "multi", "compiled_math": False,
            "seconds": dt, "finite": pack.finite_members(), "capture_failed": pack.captured.failed}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _write(path: str | None, doc: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wrn22", choices=["wrn22", "small_cnn", "resnet18"])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--ks", default="1,2,4,8,16", help="pack sizes K to time")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 on CPU, 8 on CUDA: "
                                                             "3 eager + the capture + replays)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--no-graph", action="store_true", help="K rows: eager steps even on CUDA")
    ap.add_argument("--no-single", action="store_true", help="skip the single-trial baseline row")
    ap.add_argument("--single-fused", default="auto", choices=["auto", "true", "false", "compiled"],
                    help="fused_bonn of the single-trial baseline")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    ap.add_argument("--out", default=None, metavar="FILE", help="JSON of the rows, rewritten after each row")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tri = {"auto": "auto", "true": True, "false": False}
    args.single_fused = {"compiled": "compiled", **tri}[args.single_fused]
    base = dict(model=args.model, width=args.width, batch_size=args.batch_size, amp=tri[args.amp],
                channels_last=tri[args.channels_last], device=args.device, nu=1e-4, feature_loss_start_epoch=0,
                epochs=1, cuda_graph=False, fused_bonn=False)
    device, amp, cl = resolve_runtime(TrainConfig.from_dict(base))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.warmup is None:
        args.warmup = 8 if device.type == "cuda" else 2
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch_size, args.in_channels, args.image_size, args.image_size, device=device, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device, generator=g)
    meta = {"device": _device_name(device), "torch": torch.__version__, "model": args.model, "width": args.width,
            "batch_size": args.batch_size, "image_size": args.image_size, "amp_bf16": amp, "channels_last": cl,
            "steps": args.steps, "warmup": args.warmup, "data": "random, on the device, one batch reused"}
    doc = {"meta": meta, "rows": []}
    print(f"\n{args.model} width {args.width}, batch {args.batch_size}, {meta['device']}, torch {torch.__version__}, "
          f"bf16={amp}, channels_last={cl}, {args.steps} timed steps; random data on the device\n")
    print("| row | graph | images/s per member | member-images/s | x single | ms/step | peak MiB | finite |")
    print("|---|---|---|---|---|---|---|---|")
    jobs = ([] if args.no_single else [("single", None)]) + [("multi", int(k)) for k in args.ks.split(",") if k]
    single_rate = None
    for kind, k in jobs:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = (run_single(args, base, device, amp, cl, x, y) if kind == "single"
                   else run_multi(args, base, device, amp, cl, x, y, k))
        except torch.OutOfMemoryError as exc:
            row = {"row": f"K={k}" if k else "single", "members": k or 1, "error": f"out of memory: {exc}"[:300]}
            print(f"| {row['row']} | - | out of memory | | | | | |")
            doc["rows"].append(row)
            _write(args.out, doc)
            continue
        m = row["members"]
        row["member_images_per_s"] = args.steps * args.batch_size / row["seconds"]
        row["aggregate_member_images_per_s"] = m * row["member_images_per_s"]
        row["ms_per_step"] = 1e3 * row["seconds"] / args.steps
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None
        if kind == "single":
            single_rate = row["aggregate_member_images_per_s"]
        row["x_single"] = row["aggregate_member_images_per_s"] / single_rate if single_rate else None
        doc["rows"].append(row)
        _write(args.out, doc)
        xs = f"{row['x_single']:.2f}" if row["x_single"] is not None else "-"
        peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
        print(f"| {row['row']} | {row['graph']} | {row['member_images_per_s']:.1f} | "
              f"{row['aggregate_member_images_per_s']:.1f} | {xs} | {row['ms_per_step']:.2f} | {peak} | "
              f"{sum(row['finite'])}/{m} |", flush=True)
    banned = sorted(b for b in BANNED if b in sys.modules)
    doc["meta"]["imported"] = banned
    _write(args.out, doc)
    if banned:
        print(f"error: imported {banned}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
