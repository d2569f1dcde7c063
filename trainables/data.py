"""Datasets by name, a seeded validation split, device-resident batches and on-device augmentation.

Readers (``cfg.dataset``; every dataset but ``digits`` needs ``cfg.data_root``):

=============== ==========================================================================================
``digits``      scikit-learn's 8x8 digits (1,797 images, 16 grey levels, lossless; ships in the wheel).
                Pixel ``v`` in 0..16 becomes ``round(v * 255 / 16)``. It has no test split: a fixed
                stratified 20% (seed ``DIGITS_TEST_SEED``, the same for every trial) is held out as test.
``mnist``,      torchvision's raw IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``) in
``fashion_mnist`` ``data_root/MNIST/raw`` (``FashionMNIST/raw``), ``data_root/raw`` or ``data_root`` itself,
                e.g. ``data_root=/usr/share/datasets/fashion-mnist`` (Debian ``dataset-fashion-mnist``).
``cifar10``,    torchvision's python pickle batches in ``data_root/cifar-10-batches-py``
``cifar100``    (``cifar-100-python``, fine labels) or ``data_root`` itself, or a packed ``.npz``.
``npz``         ``data_root`` = an ``.npz`` with ``x_train, y_train, x_test, y_test`` (images N x H x W [x C]
                uint8) and optionally ``classes`` (``python -m trainables pack-images`` writes one).
``imagefolder`` ``data_root/train/<class>/*`` and ``data_root/test/<class>/*`` decoded with Pillow (all images
                of one size); pack it once with ``pack-images`` to skip the decoding on every trial.
=============== ==========================================================================================

Splits: the validation split (``cfg.val_fraction``) is carved from the training split, stratified by
class, with ``numpy.random.default_rng(cfg.seed)``, so trials with the same seed see the same split. The
test split is only evaluated for the final report.

On the device: the whole dataset lives there as one ``uint8`` N x C x H x W tensor per split. Every epoch
draws a permutation from a ``torch.Generator`` on the device (saved in checkpoints for exact resume),
slices batches with it, augments them batched on the device (no per-sample Python) and normalises
them with the per-channel mean/std of the training split. Augmentation (``augment``): ``crop_flip`` =
zero-pad 4 + random crop back to H x W + random horizontal flip (the WRN/CIFAR recipe) for ``cifar10``,
``cifar100`` and 3-channel ``npz``/``imagefolder`` data; ``none`` for digits, MNIST and Fashion-MNIST.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ConfigError, TrainConfig

__all__ = ["DeviceData", "HostData", "load_host_data", "stratified_split", "augment_crop_flip",
           "pack_images", "read_imagefolder", "DIGITS_TEST_SEED"]

DIGITS_TEST_SEED = 0
DIGITS_TEST_FRACTION = 0.2
CROP_PAD = 4


@dataclass
class HostData:
    """Arrays on the host: images N x H x W x C uint8, labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]


# ----------------------------------------------------------------------------- readers
def _digits() -> HostData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    train_idx, test_idx = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return HostData(x[train_idx], y[train_idx], x[test_idx], y[test_idx], [str(c) for c in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist_like(root: Path, dataset: str) -> HostData:
    sub = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[dataset]
    candidates = [root / sub / "raw", root / "raw", root]
    for folder in candidates:
        files = [_find_idx(folder, s) for s in _IDX_FILES]
        if all(files):
            xtr, ytr, xte, yte = (_read_idx(f) for f in files)
            classes = ([str(i) for i in range(10)] if dataset == "mnist" else
                       ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                        "Sneaker", "Bag", "Ankle boot"])
            return HostData(xtr[..., None], ytr.astype(np.int64), xte[..., None],
                            yte.astype(np.int64), classes)
    raise ConfigError("data_root", f"no {dataset} IDX files found (looked in "
                      f"{', '.join(str(c) for c in candidates)})", str(root))


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _cifar(root: Path, dataset: str) -> HostData:
    if root.is_file():
        return _npz(root)
    if dataset == "cifar10":
        sub, train_files, test_files, key = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], "labels"
        meta, meta_key = "batches.meta", "label_names"
    else:
        sub, train_files, test_files, key = "cifar-100-python", ["train"], ["test"], "fine_labels"
        meta, meta_key = "meta", "fine_label_names"
    candidates = [root / sub, root]
    for folder in candidates:
        if all((folder / f).is_file() for f in train_files + test_files):
            def read(files):
                parts = [_unpickle(folder / f) for f in files]
                x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                y = np.concatenate([np.asarray(p[key]) for p in parts]).astype(np.int64)
                return np.ascontiguousarray(x, dtype=np.uint8), y
            xtr, ytr = read(train_files)
            xte, yte = read(test_files)
            classes = (list(_unpickle(folder / meta)[meta_key]) if (folder / meta).is_file()
                       else [str(i) for i in range(int(ytr.max()) + 1)])
            return HostData(xtr, ytr, xte, yte, classes)
    raise ConfigError("data_root", f"no {dataset} pickle batches found (looked in "
                      f"{', '.join(str(c) for c in candidates)})", str(root))


def _as_nhwc_uint8(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{name}: expected N x H x W [x C] images, got shape {x.shape}")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and float(x.max()) <= 1.0:
            x = np.rint(x * 255.0)
        x = x.clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


def _npz(path: Path) -> HostData:
    if not path.is_file():
        raise ConfigError("data_root", "must be an .npz file", str(path))
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ConfigError("data_root", f"npz lacks {missing}", str(path))
        xtr, xte = _as_nhwc_uint8(z["x_train"], "x_train"), _as_nhwc_uint8(z["x_test"], "x_test")
        ytr, yte = z["y_train"].astype(np.int64).ravel(), z["y_test"].astype(np.int64).ravel()
        n_classes = int(max(ytr.max(), yte.max())) + 1
        classes = [str(c) for c in z["classes"]] if "classes" in z.files else [str(i) for i in range(n_classes)]
    return HostData(xtr, ytr, xte, yte, classes)


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def read_imagefolder(root: str | os.PathLike) -> HostData:
    """Decode ``root/{train,test}/<class>/*`` into uint8 arrays (class index = sorted folder order)."""
    from PIL import Image

    root = Path(root)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ConfigError("data_root", "needs train/<class>/ and test/<class>/ folders", str(root))
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise ConfigError("data_root", "no class folders under train/", str(root))
    index = {c: i for i, c in enumerate(classes)}
    mode = None

    def read(split):
        nonlocal mode
        xs, ys = [], []
        for c in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
            if c not in index:
                raise ConfigError("data_root", f"class folder {split}/{c} has no train/{c}", str(root))
            files = sorted((f for f in (root / split / c).iterdir() if f.suffix.lower() in _IMAGE_EXT),
                           key=_natural_key)
            for f in files:
                with Image.open(f) as im:
                    if mode is None:
                        mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    a = np.asarray(im.convert(mode), dtype=np.uint8)
                if xs and a.shape != xs[0].shape:
                    raise ValueError(f"{f}: size {a.shape} differs from {xs[0].shape}; resize first")
                xs.append(a)
                ys.append(index[c])
        if not xs:
            raise ConfigError("data_root", f"no images under {split}/", str(root))
        return _as_nhwc_uint8(np.stack(xs), split), np.asarray(ys, dtype=np.int64)

    xtr, ytr = read("train")
    xte, yte = read("test")
    return HostData(xtr, ytr, xte, yte, classes)


def pack_images(src: str | os.PathLike, out: str | os.PathLike, compress: bool = False) -> dict:
    """Pack a ``train/<class>/*``, ``test/<class>/*`` tree into one ``.npz`` (N x H x W x C uint8)."""
    data = read_imagefolder(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    (np.savez_compressed if compress else np.savez)(
        tmp, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
        classes=np.asarray(data.classes))
    os.replace(tmp, out)
    return {"path": str(out), "x_train": data.x_train.shape, "x_test": data.x_test.shape,
            "classes": data.classes, "bytes": out.stat().st_size}


def load_host_data(cfg: TrainConfig) -> HostData:
    if cfg.dataset == "digits":
        return _digits()
    root = Path(os.path.expanduser(cfg.data_root))
    if not root.exists():
        raise ConfigError("data_root", "path does not exist", cfg.data_root)
    if cfg.dataset in ("mnist", "fashion_mnist"):
        return _mnist_like(root, cfg.dataset)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _cifar(root, cfg.dataset)
    if cfg.dataset == "npz":
        return _npz(root)
    if cfg.dataset == "imagefolder":
        return _npz(root) if root.is_file() else read_imagefolder(root)
    raise ConfigError("dataset", "unknown dataset", cfg.dataset)  # pragma: no cover (config checks it)


# ----------------------------------------------------------------------------- splits
def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(y)-1`` into (keep, held_out), ``round(fraction * n_c)`` of every class
    ``c`` held out (at least 1 and at most ``n_c - 1`` when ``n_c >= 2``). Deterministic in ``seed``;
    both index arrays are sorted."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


# ----------------------------------------------------------------------------- augmentation
def augment_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None,
                      pad: int = CROP_PAD) -> torch.Tensor:
    """Batched random crop (zero padding ``pad``) and horizontal flip of ``x`` (B x C x H x W, any dtype),
    all on ``x``'s device with one gather (no per-sample Python)."""
    b, c, h, w = x.shape
    dev = x.device
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=generator)
    flip = torch.randint(0, 2, (b, 1), device=dev, generator=generator).bool()
    rows = oy + torch.arange(h, device=dev)                      # B x H
    cols_fwd = torch.arange(w, device=dev)
    cols = ox + torch.where(flip, cols_fwd.flip(0), cols_fwd)    # B x W (flip folded into the gather)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
    return out.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- device data
def _channel_moments(x: torch.Tensor, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 N x C x H x W images scaled to [0, 1] (float64, chunked)."""
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64, device=x.device)
    s2 = torch.zeros(c, dtype=torch.float64, device=x.device)
    for i in range(0, int(x.shape[0]), chunk):
        xf = x[i:i + chunk].to(torch.float64) / 255.0
        s1 += xf.sum(dim=(0, 2, 3))
        s2 += (xf * xf).sum(dim=(0, 2, 3))
    n = max(1, x.numel() // c)
    mean = (s1 / n).cpu().numpy()
    var = np.maximum((s2 / n).cpu().numpy() - mean ** 2, 0.0)
    return mean, np.sqrt(var)


class DeviceData:
    """The whole dataset on one device, as uint8 N x C x H x W tensors, with batch iterators."""

    def __init__(self, host: HostData, val_fraction: float, seed: int, device: torch.device | str,
                 augment: str, dataset: str = ""):
        self.device = torch.device(device)
        self.dataset = dataset
        self.classes = list(host.classes)
        self.num_classes = max(len(self.classes), int(max(host.y_train.max(), host.y_test.max())) + 1)
        keep, val = stratified_split(host.y_train, val_fraction, seed)
        self.train_index, self.val_index = keep, val

        def to_dev(x, y):
            xt = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
            return xt.to(self.device), torch.from_numpy(np.ascontiguousarray(y)).to(self.device)

        self.x_train, self.y_train = to_dev(host.x_train[keep], host.y_train[keep])
        self.x_val, self.y_val = to_dev(host.x_train[val], host.y_train[val])
        self.x_test, self.y_test = to_dev(host.x_test, host.y_test)
        self.in_channels, self.image_size = int(self.x_train.shape[1]), int(self.x_train.shape[2])
        mean, std = _channel_moments(self.x_train)
        std = np.where(std > 1e-8, std, 1.0)
        self.mean, self.std = mean.tolist(), std.tolist()
        # x_norm = x_uint8 * scale + shift  ==  (x / 255 - mean) / std
        self._scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._shift = torch.tensor(-mean / std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if augment not in ("none", "crop_flip"):
            raise ValueError(f"augment: must be 'none' or 'crop_flip' (got {augment!r})")
        self.augment = augment

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device | str) -> "DeviceData":
        host = load_host_data(cfg)
        natural = host.x_train.shape[-1] == 3 and host.x_train.shape[1] >= 16
        augment = ("crop_flip" if cfg.dataset in ("cifar10", "cifar100")
                   or (cfg.dataset in ("npz", "imagefolder") and natural) else "none")
        return cls(host, cfg.val_fraction, cfg.seed, device, augment, cfg.dataset)

    def __repr__(self):
        return (f"DeviceData({self.dataset or 'data'}: train {tuple(self.x_train.shape)}, "
                f"val {tuple(self.x_val.shape)}, test {tuple(self.x_test.shape)}, "
                f"{self.num_classes} classes, augment={self.augment}, device={self.device})")

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches only (drop_last), at least one batch."""
        return max(1, self.n_train // batch_size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self._scale + self._shift

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None,
                      augment: bool = True, shard: tuple[int, int] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch: a fresh permutation from ``generator``, full batches, augmented and normalised.

        ``shard=(rank, world)`` (data-parallel training): ``batch_size`` stays the *global* batch; each
        global batch is cut into ``world`` contiguous slices and this worker gets slice ``rank``
        (sizes differ by at most one). Every worker must pass an identically seeded ``generator``:
        the permutation and the augmentation are drawn for the whole global batch on every worker,
        so the generators stay in step and the union of the slices is exactly the batch a single
        process would train on.
        """
        perm = torch.randperm(self.n_train, device=self.device, generator=generator)
        bs = min(batch_size, self.n_train)
        rank, world = shard if shard is not None else (0, 1)
        lo, hi = rank * bs // world, (rank + 1) * bs // world
        crop_flip = augment and self.augment == "crop_flip"
        for s in range(self.steps_per_epoch(batch_size)):
            idx = perm[s * bs:(s + 1) * bs]
            if world > 1 and not crop_flip:
                idx = idx[lo:hi]
            x = self.x_train[idx]
            if crop_flip:
                x = augment_crop_flip(x, generator)
                if world > 1:
                    x, idx = x[lo:hi], idx[lo:hi]
            yield self.normalize(x), self.y_train[idx]

    def eval_batches(self, split: str, batch_size: int = 1024) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = {"val": (self.x_val, self.y_val), "test": (self.x_test, self.y_test),
                "train": (self.x_train, self.y_train)}[split]
        for s in range(0, int(x.shape[0]), batch_size):
            yield self.normalize(x[s:s + batch_size]), y[s:s + batch_size]
