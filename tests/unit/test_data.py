"""Datasets: splits, readers of every on-disk format, device batches, batched augmentation.

The format readers are exercised with scikit-learn's real digits written out in each format (IDX,
CIFAR pickles, .npz, an image folder); no accuracy is claimed from them.
"""
import gzip
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.config import ConfigError, TrainConfig
from trainables.data import (DIGITS_TEST_SEED, DeviceData, augment_crop_flip, load_host_data, pack_images,
                             stratified_split)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    return load_host_data(TrainConfig.from_dict({}))


# ----------------------------------------------------------------------------- splits
def test_digits_arrays(digits):
    assert digits.x_train.dtype == np.uint8 and digits.x_train.shape[1:] == (8, 8, 1)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    assert len(digits.x_test) == 359  # fixed stratified 20% test split
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_digits_test_split_is_the_same_for_every_seed(digits):
    again = load_host_data(TrainConfig.from_dict({"seed": 7}))
    assert np.array_equal(digits.x_test, again.x_test) and np.array_equal(digits.y_test, again.y_test)
    assert DIGITS_TEST_SEED == 0


def test_split_deterministic_disjoint_stratified(digits):
    y = digits.y_train
    keep1, val1 = stratified_split(y, 0.1, seed=3)
    keep2, val2 = stratified_split(y, 0.1, seed=3)
    assert np.array_equal(keep1, keep2) and np.array_equal(val1, val2)
    assert not set(keep1) & set(val1)
    assert np.array_equal(np.sort(np.concatenate([keep1, val1])), np.arange(len(y)))
    counts = np.bincount(y)
    assert np.array_equal(np.bincount(y[val1], minlength=10), np.rint(0.1 * counts).astype(int))
    _, val3 = stratified_split(y, 0.1, seed=4)
    assert not np.array_equal(val1, val3)


def test_device_data_split_follows_seed_and_fraction(digits):
    a = DeviceData(digits, 0.25, seed=0, device="cpu", augment="none")
    b = DeviceData(digits, 0.25, seed=0, device="cpu", augment="none")
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape[0] + a.x_val.shape[0] == len(digits.x_train)
    assert abs(a.x_val.shape[0] / len(digits.x_train) - 0.25) < 0.01
    assert a.x_train.dtype == torch.uint8 and a.x_train.shape[1:] == (1, 8, 8)
    # the training part is disjoint from the validation part
    assert not set(a.train_index) & set(a.val_index)


# ----------------------------------------------------------------------------- batches
def test_train_batches_cover_each_sample_once_per_epoch(digits):
    data = DeviceData(digits, 0.1, seed=0, device="cpu", augment="none")
    g = torch.Generator().manual_seed(0)
    batches = list(data.train_batches(100, g))
    assert len(batches) == data.n_train // 100 == data.steps_per_epoch(100)
    xs = torch.cat([x for x, _ in batches])
    assert xs.dtype == torch.float32 and xs.shape == (len(batches) * 100, 1, 8, 8)
    # rows are distinct samples (a permutation, not sampling with replacement)
    rows = {tuple(r.tolist()) for r in xs.flatten(1)}
    assert len(rows) >= len(xs) - 5  # digits has a few duplicate images
    full = torch.cat([x for x, _ in data.train_batches(data.n_train, g)])
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-2  # normalised
    assert not torch.equal(batches[0][1], next(data.train_batches(100, g))[1])  # a new permutation


def test_eval_batches_keep_order(digits):
    data = DeviceData(digits, 0.1, seed=0, device="cpu", augment="none")
    ys = torch.cat([y for _, y in data.eval_batches("test", 64)])
    assert torch.equal(ys, torch.from_numpy(digits.y_test))


# ----------------------------------------------------------------------------- augmentation
def test_crop_flip_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = augment_crop_flip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # each output is one of the 2 * 9 * 9 crops/flips of its padded input
        found = any(torch.equal(out[i], c) for oy in range(9) for ox in range(9)
                    for c in (pad[i, :, oy:oy + 32, ox:ox + 32], pad[i, :, oy:oy + 32, ox:ox + 32].flip(-1)))
        assert found, f"sample {i} is not a crop of its padded input"
    again = augment_crop_flip(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # deterministic in the generator


def test_crop_flip_varies_across_samples():
    x = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32).repeat(64, 1, 1, 1)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:40].tolist()) for o in out}) > 20


# ----------------------------------------------------------------------------- on-disk formats
def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.mark.parametrize("dataset, sub", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                          ("fashion_mnist", "")])
def test_idx_reader(tmp_path, digits, dataset, sub):
    folder = tmp_path / sub
    folder.mkdir(parents=True, exist_ok=True)
    xtr, xte = digits.x_train[..., 0], digits.x_test[..., 0]
    _write_idx(folder / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", digits.y_train)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", digits.y_test)
    host = load_host_data(TrainConfig.from_dict({"dataset": dataset, "data_root": str(tmp_path)}))
    assert np.array_equal(host.x_train, digits.x_train) and np.array_equal(host.y_test, digits.y_test)


def test_idx_reader_reports_where_it_looked(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_host_data(TrainConfig.from_dict({"dataset": "mnist", "data_root": str(tmp_path)}))
    assert ei.value.field == "data_root" and "no mnist IDX files found" in str(ei.value)


def _to_rgb32(x):  # 8x8x1 -> 32x32x3 by pixel repetition
    return np.repeat(np.kron(x[..., 0], np.ones((4, 4), dtype=np.uint8))[..., None], 3, axis=-1)


def test_cifar_pickle_reader(tmp_path, digits):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    xtr, xte = _to_rgb32(digits.x_train[:500]), _to_rgb32(digits.x_test[:100])
    flat = lambda x: x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # noqa: E731
    for i, part in enumerate(np.array_split(np.arange(500), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": flat(xtr[part]), "labels": digits.y_train[part].tolist()}, fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": flat(xte), "labels": digits.y_test[:100].tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    cfg = TrainConfig.from_dict({"dataset": "cifar10", "data_root": str(tmp_path)})
    host = load_host_data(cfg)
    assert np.array_equal(host.x_train, xtr) and np.array_equal(host.y_train, digits.y_train[:500])
    assert host.classes[3] == "c3"
    data = DeviceData.from_config(cfg, "cpu")
    assert data.augment == "crop_flip" and data.x_train.shape[1:] == (3, 32, 32)


def test_npz_and_missing_keys(tmp_path, digits):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=digits.x_train[..., 0], y_train=digits.y_train, x_test=digits.x_test[..., 0],
             y_test=digits.y_test)
    cfg = TrainConfig.from_dict({"dataset": "npz", "data_root": str(path)})
    host = load_host_data(cfg)
    assert host.x_train.shape == digits.x_train.shape and host.classes == [str(i) for i in range(10)]
    assert DeviceData.from_config(cfg, "cpu").augment == "none"  # grey images: no crop/flip
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=digits.x_train)
    with pytest.raises(ConfigError, match=r"npz lacks \['y_train', 'x_test', 'y_test'\]"):
        load_host_data(TrainConfig.from_dict({"dataset": "npz", "data_root": str(bad)}))


def _write_folder(root: Path, digits, n=30):
    from PIL import Image

    for split, x, y in (("train", digits.x_train[:n], digits.y_train[:n]), ("test", digits.x_test[:n], digits.y_test[:n])):
        for i, (img, lab) in enumerate(zip(x, y)):
            d = root / split / f"class_{lab}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_to_rgb32(img[None])[0]).save(d / f"{i}.png")
    for lab in range(10):  # every test class exists in train
        (root / "train" / f"class_{lab}").mkdir(parents=True, exist_ok=True)


def test_imagefolder_and_pack_images_cli(tmp_path, digits):
    _write_folder(tmp_path / "tree", digits)
    cfg = TrainConfig.from_dict({"dataset": "imagefolder", "data_root": str(tmp_path / "tree")})
    host = load_host_data(cfg)
    assert host.x_train.shape == (30, 32, 32, 3) and host.x_train.dtype == np.uint8
    assert host.classes == [f"class_{i}" for i in range(10)]
    out = tmp_path / "packed.npz"
    subprocess.run([sys.executable, "-m", "trainables", "pack-images", str(tmp_path / "tree"), str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    packed = load_host_data(TrainConfig.from_dict({"dataset": "npz", "data_root": str(out)}))
    assert np.array_equal(packed.x_train, host.x_train) and np.array_equal(packed.y_test, host.y_test)
    assert packed.classes == host.classes
    info = pack_images(tmp_path / "tree", tmp_path / "c.npz", compress=True)
    assert info["x_train"] == (30, 32, 32, 3)
