"""cdkernels.data: embedded digits, IDX (Fashion-MNIST) and CIFAR loaders, splits, augmentation."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from cdkernels import data as D

FMNIST = "/usr/share/datasets/fashion-mnist"


def write_idx(path, arr, gz=False, magic=None):
    arr = np.asarray(arr, dtype=np.uint8)
    head = magic if magic is not None else struct.pack(">HBB", 0, 8, arr.ndim)
    blob = head + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(blob)


def make_idx_dir(folder, n_train=30, n_test=10, gz=True, hw=28):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{sfx}"),
                  rng.integers(0, 256, (n, hw, hw)), gz)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{sfx}"),
                  rng.integers(0, 10, n), gz)
    return folder


def make_fake_cifar(folder, classes=10, n_per_batch=20, n_test=10):
    """The python-pickle layout of CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100."""
    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)

    def batch(n):
        d = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8)}
        labels = rng.integers(0, classes, n).tolist()
        d[b"labels" if classes == 10 else b"fine_labels"] = labels
        if classes == 100:
            d[b"coarse_labels"] = [x // 5 for x in labels]
        return d
    files = ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10
             else ["train", "test"])
    for f in files:
        n = n_test if "test" in f else n_per_batch * (5 if classes == 100 else 1)
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(batch(n), fh)
    return folder


def test_digits_splits():
    d = D.load("digits")
    assert (len(d.train), len(d.val), len(d.test)) == (1294, 144, 359)
    assert d.in_channels == 1 and d.image_size == (8, 8) and d.num_classes == 10
    assert d.train.images.dtype == torch.uint8 and int(d.train.images.max()) <= 16
    assert not d.flip  # flipping digits changes their meaning
    x, y = d.batch(d.test, torch.arange(10), train=False)
    raw = d.test.images[:10].float() / 16
    assert 0 <= raw.min() and raw.max() <= 1
    torch.testing.assert_close(x, (raw - d.mean.view(1, -1, 1, 1)) / d.std.view(1, -1, 1, 1))
    d2 = D.load("digits")  # deterministic, independent of any seed
    assert torch.equal(d.val.labels, d2.val.labels) and torch.equal(d.test.images, d2.test.images)
    d3 = D.load("digits", limit_train=100)
    assert len(d3.train) == 100 and torch.equal(d3.val.images, d.val.images)


def test_idx_loader_plain_and_gz(tmp_path):
    for gz in (True, False):
        folder = make_idx_dir(str(tmp_path / f"gz{gz}"), gz=gz)
        d = D.load("fashion-mnist", data_dir=folder, val_fraction=0.2)
        assert (len(d.train), len(d.val), len(d.test)) == (24, 6, 10)
        assert d.train.images.shape[1:] == (1, 28, 28) and d.flip


@pytest.mark.parametrize("corruption", ["magic", "truncated", "truncated_gz", "label_range",
                                        "count_mismatch", "missing"])
def test_idx_loader_errors(tmp_path, corruption):
    folder = make_idx_dir(str(tmp_path), gz=False)
    img = os.path.join(folder, "train-images-idx3-ubyte")
    lab = os.path.join(folder, "train-labels-idx1-ubyte")
    if corruption == "magic":
        write_idx(img, np.zeros((30, 28, 28)), magic=b"\x00\x00\x0d\x03")
        msg = "magic"
    elif corruption == "truncated":
        blob = open(img, "rb").read()
        open(img, "wb").write(blob[:-100])
        msg = "truncated"
    elif corruption == "truncated_gz":
        os.remove(img)
        write_idx(img + ".gz", np.zeros((30, 28, 28)), gz=True)
        blob = open(img + ".gz", "rb").read()
        open(img + ".gz", "wb").write(blob[:len(blob) // 2])
        msg = "truncated or corrupt"
    elif corruption == "label_range":
        write_idx(lab, np.full(30, 12))
        msg = "out of range"
    elif corruption == "count_mismatch":
        write_idx(lab, np.zeros(29))
        msg = "30 images but 29 labels"
    else:
        os.remove(lab)
        msg = "missing train-labels-idx1-ubyte"
    with pytest.raises(D.DataError, match=msg) as e:
        D.load("fashion-mnist", data_dir=folder)
    assert "apt-get install dataset-fashion-mnist" in str(e.value)


def test_missing_dirs(tmp_path):
    with pytest.raises(D.DataError, match="not a directory.*apt-get install"):
        D.load("fashion-mnist", data_dir=str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="needs --data-dir.*cifar"):
        D.load("cifar10")
    with pytest.raises(D.DataError, match="missing data_batch_1"):
        D.load("cifar10", data_dir=str(tmp_path))
    with pytest.raises(D.DataError, match="unknown dataset"):
        D.load("imagenet")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_package():
    d = D.load("fashion-mnist")
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert d.image_size == (28, 28) and d.num_classes == 10
    assert int(d.train.labels.max()) == 9 and int(d.test.labels.min()) == 0
    assert 0.25 < float(d.mean) < 0.32  # the known Fashion-MNIST mean, 0.286


@pytest.mark.parametrize("classes", [10, 100])
def test_fake_cifar(tmp_path, classes):
    name = "cifar10" if classes == 10 else "cifar100"
    sub = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    make_fake_cifar(str(tmp_path / sub), classes)
    d = D.load(name, data_dir=str(tmp_path), val_fraction=0.1)  # finds the sub-folder
    assert len(d.train) + len(d.val) == 100 and len(d.test) == 10 and d.num_classes == classes
    assert d.train.images.shape[1:] == (3, 32, 32) and d.pad == 4 and d.flip
    x, y = d.batch(d.train, torch.arange(8), train=True)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_corrupt_and_unsafe(tmp_path):
    folder = make_fake_cifar(str(tmp_path / "c"), 10)
    p = os.path.join(folder, "data_batch_3")
    blob = open(p, "rb").read()
    open(p, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(D.DataError, match="data_batch_3.*not a valid CIFAR"):
        D.load("cifar10", data_dir=folder)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(p, "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(D.DataError, match="refusing to load global"):
        D.load("cifar10", data_dir=folder)
    make_fake_cifar(folder, 10)
    with open(p, "wb") as fh:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, fh)
    with pytest.raises(D.DataError, match="labels out of range"):
        D.load("cifar10", data_dir=folder)


def test_augment():
    torch.manual_seed(0)
    imgs = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4).repeat(50, 1, 1, 1)
    out = D.augment(imgs, pad=0, flip=True)
    same = (out == imgs).flatten(1).all(1)
    flipped = (out == imgs.flip(3)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()
    out = D.augment(imgs, pad=1, flip=False)
    assert out.shape == imgs.shape
    assert not torch.equal(out, imgs)
    # each crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(imgs, (1, 1, 1, 1))
    for i in range(10):
        assert any(torch.equal(out[i], padded[i, :, r:r + 4, c:c + 4])
                   for r in range(3) for c in range(3))


def test_batch_indices():
    g = torch.Generator().manual_seed(0)
    b = D.batch_indices(10, 3, g, "cpu")
    assert [len(x) for x in b] == [3, 3, 3]
    assert len(set(torch.cat(b).tolist())) == 9
    b = D.batch_indices(10, 3, g, "cpu", shuffle=False, drop_last=False)
    assert torch.equal(torch.cat(b), torch.arange(10))
