"""Command line of the training core (no Ray needed).

    python -m trainables train --config dataset=digits epochs=20 lr=0.1 [--checkpoint-dir DIR] [--json]
    python -m trainables pack-images SRC_DIR OUT.npz [--compress]

``train`` prints the start-up log and one line of metrics per epoch (``--json``: one JSON object per
epoch instead). Values of ``--config k=v`` are read as JSON where they parse (``1e-4``, ``true``,
``null``, ``[0.5, 0.75]``), else as strings (``dataset=cifar10``, ``amp=auto``).

``pack-images`` packs ``SRC_DIR/train/<class>/*`` and ``SRC_DIR/test/<class>/*`` (e.g. the CIFAR-10 JPEG
repository) into one ``.npz`` with ``x_train`` (N x H x W x C uint8), ``y_train``, ``x_test``,
``y_test`` and ``classes``; use it as ``dataset=npz data_root=OUT.npz`` (or ``dataset=cifar10``).
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--config: expected key=value (got {item!r})")
        out[key.strip()] = parse_value(value.strip())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainables", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train one config and print per-epoch metrics")
    tr.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE")
    tr.add_argument("--checkpoint-dir", default=None)
    tr.add_argument("--json", action="store_true", help="print each epoch's metrics as one JSON line")
    pk = sub.add_parser("pack-images", help="pack a train/<class>, test/<class> image tree into .npz")
    pk.add_argument("src")
    pk.add_argument("out")
    pk.add_argument("--compress", action="store_true")
    args = ap.parse_args(argv)

    if args.cmd == "pack-images":
        from .data import pack_images

        info = pack_images(args.src, args.out, compress=args.compress)
        print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in info.items()}))
        return 0

    from .config import ConfigError
    from .train import TrainingDiverged, fit

    cfg = parse_overrides(args.config)
    report = (lambda m: print(json.dumps(m), flush=True)) if args.json else None
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else None
    try:
        fit(cfg, report=report, checkpoint_dir=args.checkpoint_dir, log=log)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
