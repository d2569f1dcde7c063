"""Training throughput of one model with binarize = none / xnor / bonn, side by side.

Every mode runs the same ``trainables.train.Trainer.train_step`` that ``fit`` uses (forward, CE,
for ``bonn`` the Bayesian kernel loss and the Bayesian feature loss both on, backward, SGD with the
fit() parameter groups, the post-step clamps), on

* ``random``: random normal images and labels already on the device (no input pipeline), and, with
  ``--real-data OUT.npz``,
* ``real``: the real input pipeline of ``fit`` (device-resident uint8 data, per-epoch permutation,
  batched crop+flip augmentation for 3-channel data, normalisation).

Execution modes (``--exec``, each a column group of the table): ``eager`` (``cuda_graph=false``) and
``graph`` (the whole step captured as a CUDA graph, ``cuda_graph=true``; CUDA only); with
``--compile`` the model is also ``torch.compile``d. For ``bonn`` both the per-layer reference path
(``fused_bonn=false``, column ``bonn-ref``), the fused all-layers path (``fused_bonn=true``,
column ``bonn``) and the fused path with its flat math and the activation sign torch.compile'd
(``fused_bonn=compiled``, column ``bonn-c``) are timed; ``none`` and ``xnor`` have no BONN layers.

Prints a markdown table (device, torch version, images/s per mode, ratio bonn/none) to stdout;
``--profile`` adds a torch.profiler summary per BONN variant (kernels per step, GPU-busy vs wall time
per step, the top kernels).

    python benchmarks/bench_train.py --model wrn22 --width 16 --device cpu --steps 5 --batch-size 64
    python benchmarks/bench_train.py --model resnet18 --width 64 --device cuda --batch-size 512 \
        --steps 50 --compile --real-data data/cifar10-jpg.npz
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainables.config import TrainConfig  # noqa: E402
from trainables.data import DeviceData  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.train import Trainer  # noqa: E402

MODES = ("none", "xnor", "bonn-ref", "bonn", "bonn-c")
EXECS = ("eager", "graph", "compile")


def _variant(mode: str, exe: str) -> dict | None:
    """TrainConfig overrides of one cell: binarize mode x execution mode (None: cell not timed).

    ``compile`` = ``torch.compile`` of the model and the step captured as a CUDA graph; the fused
    all-layers path is off under compile (the compiled model binarizes per layer, the kernel loss
    runs fused outside it), so ``bonn-ref`` is not timed there (it would be the same cell).
    """
    if exe == "compile" and mode in ("bonn-ref", "bonn-c"):
        return None
    fused = {"bonn": True, "bonn-c": "compiled"}.get(mode, False)
    return {"binarize": "bonn" if mode.startswith("bonn") else mode, "fused_bonn": fused,
            "cuda_graph": exe in ("graph", "compile"), "compile": exe == "compile"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches_random(device, batch, in_ch, size, num_classes, seed=0):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randn(batch, in_ch, size, size, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)
    while True:
        yield x, y


def _batches_real(data: DeviceData, batch: int, device):
    g = torch.Generator(device=device)
    g.manual_seed(0)
    while True:
        yield from data.train_batches(batch, g)


def measure(cfg: TrainConfig, device, amp, cl, batches, in_ch, size, num_classes, steps, warmup,
            profile: int = 0) -> float:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, in_ch, num_classes, size)
    trainer = Trainer(cfg, model, num_classes, device, steps_per_epoch=max(steps, 1), amp=amp,
                      channels_last=cl, log=lambda m: print(m, file=sys.stderr))
    trainer.set_epoch(0)  # bonn: feature loss on from the first step
    for _ in range(warmup):
        x, y = next(batches)
        trainer.train_step(x, y)
    trainer.read_sums()
    _sync(device)
    trainer.reset_sums()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        trainer.train_step(x, y)
    sums = trainer.read_sums()  # host sync
    _sync(device)
    dt = time.perf_counter() - t0
    if not all(v == v for v in sums.values()):
        print(f"warning: non-finite loss in {cfg.binarize}", file=sys.stderr)
    if trainer.captured.failed:
        print(f"warning: CUDA graph capture failed ({trainer.captured.failed}); timed eagerly", file=sys.stderr)
    if profile:
        _profile(trainer, batches, profile, device, cfg)
    return steps * cfg.batch_size / dt


_PROFILES: dict[tuple, dict[str, tuple[float, float]]] = {}


def _profile(trainer: Trainer, batches, steps: int, device, cfg: TrainConfig) -> None:
    """Where the time of a step goes: kernels launched, GPU-busy time and wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            x, y = next(batches)
            trainer.train_step(x, y)
        _sync(device)
    wall = (time.perf_counter() - t0) / steps * 1e3
    ev = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e3 / steps
        tag = (f"{cfg.binarize} fused={trainer.fused} compiled_math={trainer.compile_math} "
               f"graph={trainer.use_graph} compile={cfg.compile}")
        print(f"[profile] {tag}: {len(kernels) / steps:.0f} GPU kernels/step, GPU busy {busy:.2f} ms/step, "
              f"wall {wall:.2f} ms/step (profiler on)")
        print(ev.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
        per = {}
        for e in kernels:
            n, t = per.get(e.name, (0, 0.0))
            per[e.name] = (n + 1, t + e.device_time)
        _PROFILES[(cfg.binarize, trainer.use_graph, cfg.compile)] = {k: (n / steps, t / steps) for k, (n, t)
                                                                     in per.items()}
        base = _PROFILES.get(("none", trainer.use_graph, cfg.compile))
        if cfg.binarize == "bonn" and base is not None:
            mine = _PROFILES[(cfg.binarize, trainer.use_graph, cfg.compile)]
            diff = sorted(((mine.get(k, (0, 0))[1] - base.get(k, (0, 0))[1],
                            mine.get(k, (0, 0))[0] - base.get(k, (0, 0))[0], k) for k in set(mine) | set(base)),
                          reverse=True)
            print(f"[profile] kernels bonn adds over none ({tag}): "
                  f"{sum(d[1] for d in diff):+.0f} kernels/step, {sum(d[0] for d in diff) / 1e3:+.3f} ms/step")
            print("| us/step | kernels/step | kernel |\n|---|---|---|")
            for dt, dn, k in diff[:15]:
                print(f"| {dt:+.1f} | {dn:+.0f} | {k[:90]} |")
    else:
        print(f"[profile] {cfg.binarize} fused={trainer.fused}: wall {wall:.2f} ms/step (profiler on)")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wrn22", choices=["wrn22", "resnet18", "small_cnn"])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, 10 with --compile)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--real-data", default=None, metavar="NPZ", help="also time the real pipeline on this .npz")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave)")
    ap.add_argument("--repeats", type=int, default=1, help="median over this many timings per cell")
    ap.add_argument("--modes", default=",".join(MODES), help="of " + ", ".join(MODES))
    ap.add_argument("--exec", default=None, help="execution modes, of eager, graph, compile (default: "
                                                 "eager on CPU, eager,graph on CUDA)")
    ap.add_argument("--profile-exec", default="eager,graph", help="execution modes to profile")
    ap.add_argument("--no-random", action="store_true", help="time the real pipeline only (needs --real-data)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile this many steps of none and bonn per profiled execution mode, "
                         "with the kernels bonn adds over none")
    args = ap.parse_args(argv)
    if args.no_random and not args.real_data:
        ap.error("--no-random: needs --real-data")
    if args.threads:
        torch.set_num_threads(args.threads)
    tri = {"auto": "auto", "true": True, "false": False}
    base = dict(model=args.model, width=args.width, batch_size=args.batch_size, compile=args.compile,
                amp=tri[args.amp], channels_last=tri[args.channels_last], device=args.device,
                lam=1e-4, theta=1e-3, feature_loss_start_epoch=0, epochs=1)
    probe = TrainConfig.from_dict(base)
    from trainables.train import resolve_runtime

    device, amp, cl = resolve_runtime(probe)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    warmup = args.warmup if args.warmup is not None else (10 if args.compile else 2)
    modes = [m for m in args.modes.split(",") if m]

    sources = [] if args.no_random else [("random", None)]
    if args.real_data:
        cfg_data = TrainConfig.from_dict({**base, "dataset": "npz", "data_root": args.real_data})
        sources.append(("real", DeviceData.from_config(cfg_data, device)))

    execs = [e for e in (args.exec or ("eager,graph" if device.type == "cuda" else "eager")).split(",") if e]
    for e in execs:
        if e not in EXECS or (e != "eager" and device.type != "cuda"):
            ap.error(f"--exec: {e!r} is not one of {list(EXECS)} (graph and compile need CUDA)")
    profile_execs = set(args.profile_exec.split(","))

    rows = []
    for name, data in sources:
        if data is None:
            in_ch, size, ncls = args.in_channels, args.image_size, args.num_classes
        else:
            in_ch, size, ncls = data.in_channels, data.image_size, data.num_classes
        for exe in execs:
            res = {}
            for mode in modes:
                over = _variant(mode, exe)
                if over is None:
                    continue
                cfg = TrainConfig.from_dict({**base, **over})
                vals = []
                for r in range(args.repeats):
                    batches = (_batches_random(device, args.batch_size, in_ch, size, ncls) if data is None
                               else _batches_real(data, args.batch_size, device))
                    prof = args.profile if (r == 0 and mode in ("none", "bonn", "bonn-c") and exe in profile_execs
                                            and name == sources[0][0]) else 0
                    # a captured step needs captured.warmup eager steps and the capture first
                    wu = max(warmup, 6) if exe != "eager" else warmup
                    vals.append(measure(cfg, device, amp, cl, batches, in_ch, size, ncls, args.steps, wu,
                                        profile=prof))
                res[mode] = statistics.median(vals)
                print(f"[bench] {name:6s} {exe:5s} {mode:8s} {res[mode]:10.1f} images/s", file=sys.stderr,
                      flush=True)
            rows.append((name, exe, res))

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(f"\ndevice: {device.type} ({dev_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"model {args.model} width {args.width}, batch {args.batch_size}, steps {args.steps} "
          f"(warmup {warmup}), amp {amp}, channels_last {cl}, compile {args.compile}\n")
    header = "| data | exec | " + " | ".join(f"{m} (img/s)" for m in modes) + " | bonn/none | bonn-c/none |"
    print(header)
    print("|" + "---|" * (len(modes) + 4))
    for name, exe, res in rows:
        ratio = [f"{res[b] / res['none']:.2f}x" if b in res and "none" in res else "-" for b in ("bonn", "bonn-c")]
        print(f"| {name} | {exe} | " + " | ".join(f"{res[m]:.0f}" if m in res else "-" for m in modes)
              + f" | {ratio[0]} | {ratio[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
