"""Several small trainings sharing one device: aggregate training images/s of N concurrent processes.

This is what a sweep with fractional GPUs does (`resources.gpus_per_trial: 1/N` packs N trials on a
card); the StudySpec's advice on fractional GPUs rests on this measurement. Each process builds the same
model and the same `trainables.train.Trainer` step as `fit` (BONN: kernel and feature loss on), warms
up, waits at a barrier, then trains for a fixed wall-clock window; images/s of all processes inside the
common window are summed.

    python benchmarks/bench_shared_gpu.py --device cuda --model wrn22 --width 16 --batch-size 128 --procs 1,2,4,8
    python benchmarks/bench_shared_gpu.py --device cpu --model small_cnn --batch-size 64 --procs 1,2 --seconds 5
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(rank: int, args: dict, barrier, results) -> None:
    import torch

    from trainables.config import TrainConfig
    from trainables.models import build_model
    from trainables.train import Trainer, resolve_runtime

    if args["device"] == "cpu":
        torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(dict(model=args["model"], width=args["width"], batch_size=args["batch_size"],
                                     binarize=args["binarize"], compile=args["compile"], device=args["device"],
                                     lam=1e-4, theta=1e-3, feature_loss_start_epoch=0, epochs=1, seed=rank))
    device, amp, cl = resolve_runtime(cfg)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, in_ch = args["image_size"], args["in_channels"]
    model = build_model(cfg, in_ch, 10, size)
    trainer = Trainer(cfg, model, 10, device, steps_per_epoch=1000, amp=amp, channels_last=cl, log=None)
    trainer.set_epoch(0)
    x = torch.randn(cfg.batch_size, in_ch, size, size, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)
    for _ in range(args["warmup"]):
        trainer.train_step(x, y)
    trainer.read_sums()  # sync
    barrier.wait()
    t0 = time.perf_counter()
    t_end = t0 + args["seconds"]
    steps = 0
    while time.perf_counter() < t_end:
        trainer.train_step(x, y)
        steps += 1
        if steps % 10 == 0:
            trainer.read_sums()  # bound the queue so the window is honest
    trainer.read_sums()
    dt = time.perf_counter() - t0
    results[rank] = steps * cfg.batch_size / dt


def run(n: int, args: dict) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    with ctx.Manager() as mgr:
        results = mgr.dict()
        procs = [ctx.Process(target=_worker, args=(r, args, barrier, results)) for r in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} of {n} processes failed (exit codes {bad})")
        per = [results[r] for r in range(n)]
    return sum(per), per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="wrn22")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--binarize", default="bonn", choices=["bonn", "xnor", "none"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = vars(ap.parse_args(argv))
    import torch

    dev = torch.cuda.get_device_name(0) if args["device"] == "cuda" else "cpu"
    rows = []
    for n in [int(v) for v in args["procs"].split(",")]:
        total, per = run(n, args)
        rows.append((n, total, per))
        print(f"[shared] {n} procs: {total:.0f} images/s aggregate", file=sys.stderr, flush=True)
    base = rows[0][1]
    print(f"\ndevice {dev}, torch {torch.__version__}, {args['model']} width {args['width']}, "
          f"binarize {args['binarize']}, batch {args['batch_size']}, compile {args['compile']}, "
          f"{args['seconds']:.0f} s window\n")
    print("| concurrent trainings | aggregate images/s | per training | vs 1 |")
    print("|---|---|---|---|")
    for n, total, per in rows:
        print(f"| {n} | {total:.0f} | {total / n:.0f} | {total / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
