"""Pack a class-per-folder JPEG tree (train/<class>/*.jpg, test/<class>/*.jpg) into one compact file
of the *undecoded* JPEG bytes, and decode such a file back into the uint8 .npz that
`trainables` reads (dataset=npz).

Why: the CIFAR-10 JPEG copy (docs/data.md) is ~62 MB as JPEG bytes but ~184 MB decoded,
and a device call carries at most 64 MiB. Pack here, carry the bytes, decode on the device.

    python scripts/pack_jpeg_bytes.py pack   SRC_DIR  OUT.jpgpack.npz
    python scripts/pack_jpeg_bytes.py unpack IN.jpgpack.npz OUT.npz [--workers 16]
"""
from __future__ import annotations

import argparse
import io
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _collect(split_dir: Path, classes: list[str]):
    blobs, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                blobs.append(f.read_bytes())
                labels.append(ci)
    return blobs, np.asarray(labels, dtype=np.int64)


def pack(src: Path, out: Path) -> None:
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    arrays = {"classes": np.asarray(classes)}
    for split in ("train", "test"):
        blobs, labels = _collect(src / split, classes)
        lengths = np.asarray([len(b) for b in blobs], dtype=np.int64)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum(lengths)])
        arrays[f"y_{split}"] = labels
        print(f"{split}: {len(blobs)} images, {lengths.sum() / 1e6:.1f} MB of encoded bytes")
    np.savez(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def _decode(chunk: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])


def unpack(src: Path, out: Path, workers: int) -> None:
    z = np.load(src)
    arrays = {"classes": z["classes"]}
    for split in ("train", "test"):
        raw, off = z[f"{split}_bytes"].tobytes(), z[f"{split}_offsets"]
        blobs = [raw[off[i]:off[i + 1]] for i in range(len(off) - 1)]
        chunks = [blobs[i:i + 2000] for i in range(0, len(blobs), 2000)]
        with ProcessPoolExecutor(workers) as ex:
            arrays[f"x_{split}"] = np.concatenate(list(ex.map(_decode, chunks)))
        arrays[f"y_{split}"] = z[f"y_{split}"]
        print(f"{split}: {arrays[f'x_{split}'].shape} decoded")
    np.savez(out, **arrays)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack"); a.add_argument("src", type=Path); a.add_argument("out", type=Path)
    b = sub.add_parser("unpack"); b.add_argument("src", type=Path); b.add_argument("out", type=Path)
    b.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        if not (args.src / "train").is_dir():
            print(f"error: {args.src}/train is not a folder of class folders", file=sys.stderr)
            return 1
        pack(args.src, args.out)
    else:
        unpack(args.src, args.out, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
