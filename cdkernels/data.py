"""Small image datasets held on the device as tensors, with on-device augmentation.

Nothing is downloaded at run time:

``digits``         scikit-learn's embedded ``load_digits`` (1797 8x8 grey images, values 0..16,
                   scaled to [0, 1]). It has no official test split: a fixed 20 % is carved off
                   as the test set (deterministic, independent of the training seed).
``fashion-mnist``  IDX files (``train-images-idx3-ubyte[.gz]`` etc.) from ``--data-dir`` or the
                   Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
``cifar10``        the python-pickle layout (``data_batch_1..5``, ``test_batch``) in
``cifar100``       ``--data-dir`` (or its ``cifar-10-batches-py`` / ``cifar-100-python``
                   sub-folder); CIFAR-100 uses ``train`` / ``test`` and the fine labels.

The validation split is carved deterministically (fixed generator, independent of the training
seed) from the training set; the test set is only ever evaluated. Images are kept as uint8 on
the device and turned into normalised float batches there (per-channel mean/std of the training
split); training batches get a random crop with zero padding and, where it makes sense
(fashion-mnist, CIFAR; not digits), a horizontal flip.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
SPLIT_SEED = 20240601  # the val/test carving never depends on --seed


class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says what was looked for and how to get it."""


# -- containers ----------------------------------------------------------------------------------

@dataclass
class Split:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class ImageData:
    """Train/val/test splits on one device, plus what is needed to make float batches."""
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    scale: float                 # raw uint8 value * scale = value in [0, 1]
    mean: torch.Tensor           # [C] of the [0, 1] training images
    std: torch.Tensor            # [C]
    pad: int = 0                 # random-crop padding for training batches
    flip: bool = False           # random horizontal flip for training batches
    classes: Optional[List[str]] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.train.images.shape[2:])

    @property
    def device(self) -> torch.device:
        return self.train.images.device

    def to(self, device) -> "ImageData":
        d = torch.device(device)
        return ImageData(self.name, self.train.to(d), self.val.to(d), self.test.to(d),
                         self.num_classes, self.scale, self.mean.to(d), self.std.to(d), self.pad,
                         self.flip, self.classes, dict(self.info))

    # -- batches ---------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor, dtype=torch.float32,
                  memory_format=torch.contiguous_format) -> torch.Tensor:
        x = images.to(dtype=torch.float32) * self.scale
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x.to(dtype=dtype, memory_format=memory_format)

    def augment(self, images: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
        """Random crop with ``pad`` zero padding and (if ``flip``) horizontal flips, per image,
        on the images' device (random numbers from ``generator`` or the device's default one)."""
        return augment(images, self.pad, self.flip, generator)

    def batch(self, split: Split, idx: torch.Tensor, train: bool,
              memory_format=torch.contiguous_format,
              generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels of ``split[idx]``; ``train`` adds augmentation,
        its random numbers from ``generator`` (on the images' device; give one, so that the
        augmentation does not share torch's global stream with the model's noise)."""
        imgs = split.images.index_select(0, idx)
        if train:
            imgs = self.augment(imgs, generator)
        return self.normalize(imgs, memory_format=memory_format), split.labels.index_select(0, idx)


def augment(images: torch.Tensor, pad: int, flip: bool,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per-image random crop (zero padding ``pad``) and random horizontal flip, on device."""
    if not pad and not flip:
        return images
    n, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if pad:
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (2, n, 1), device=dev, generator=generator)
        rows = rows + off[0]
        cols = cols + off[1]
    else:
        padded = images
    if flip:
        f = torch.rand((n, 1), device=dev, generator=generator) < 0.5
        cols = torch.where(f, cols.flip(1), cols)
    b = torch.arange(n, device=dev).view(n, 1, 1, 1)
    ch = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[b, ch, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def batch_indices(n: int, batch_size: int, generator: Optional[torch.Generator], device,
                  shuffle: bool = True, drop_last: bool = True) -> List[torch.Tensor]:
    """Index batches of one epoch: a permutation drawn from ``generator`` (CPU, so its state
    can be checkpointed), moved to ``device`` once, sliced into batches there."""
    if shuffle:
        perm = torch.randperm(n, generator=generator).to(device)
    else:
        perm = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return [perm[i:i + batch_size] for i in range(0, stop, batch_size)]


# -- IDX (MNIST / Fashion-MNIST) -----------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8}


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read()
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or corrupt "
                        "file? reinstall or re-download it)") from None


def read_idx(path: str, ndim: int) -> np.ndarray:
    """An IDX file (plain or gzipped) as a uint8 array with ``ndim`` dimensions; the magic
    number, dimensions and payload size are validated."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, nd = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_TYPES or nd != ndim:
        raise DataError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected "
                        f"0x000008{ndim:02x}: unsigned bytes, {ndim} dimensions)")
    if len(data) < 4 + 4 * nd:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    size = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - 4 - 4 * nd
    if payload != size:
        raise DataError(f"{path}: IDX header says {dims} ({size} bytes) but the file holds "
                        f"{payload} bytes of data (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims).copy()


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def _find(folder: str, stem: str) -> Optional[str]:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                 stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


def load_idx_folder(folder: str, num_classes: int = 10, expect_hw=(28, 28)):
    """((train_x, train_y), (test_x, test_y)) as uint8 [N,1,H,W] / int64 [N] arrays."""
    paths = {k: _find(folder, v) for k, v in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[k] + "[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    out = []
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_images"], 3)
        y = read_idx(paths[f"{split}_labels"], 1)
        if expect_hw and tuple(x.shape[1:]) != tuple(expect_hw):
            raise DataError(f"{paths[f'{split}_images']}: images are {x.shape[1:]}, expected "
                            f"{tuple(expect_hw)}")
        if len(x) != len(y):
            raise DataError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        if len(y) == 0:
            raise DataError(f"{folder}: the {split} split is empty")
        if int(y.max()) >= num_classes:
            raise DataError(f"{paths[f'{split}_labels']}: label {int(y.max())} out of range "
                            f"0..{num_classes - 1}")
        out.append((x[:, None], y.astype(np.int64)))
    return out[0], out[1]


# -- CIFAR (python pickle layout) ----------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Only the globals a CIFAR batch needs (numpy arrays); anything else is refused."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            d = _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except Exception as e:  # truncated / corrupt pickle
        raise DataError(f"{path}: not a valid CIFAR python batch ({type(e).__name__}: {e})"
                        ) from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict, got {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: str, label_key: str, num_classes: int):
    d = _load_pickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: missing 'data' or '{label_key}' (keys: {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: {len(x)} images but labels of shape {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels out of range 0..{num_classes - 1}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar_folder(folder: str, num_classes: int):
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    if os.path.isdir(os.path.join(folder, sub)):
        folder = os.path.join(folder, sub)
    if num_classes == 10:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, key = ["test_batch"], "labels"
    else:
        train_files, test_files, key = ["train"], ["test"], "fine_labels"
    missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}")
    out = []
    for files in (train_files, test_files):
        parts = [_cifar_batch(os.path.join(folder, f), key, num_classes) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if len(y) == 0:
            raise DataError(f"{folder}: no images in {', '.join(files)}")
        out.append((x, y))
    return out[0], out[1]


# -- digits --------------------------------------------------------------------------------------

TRAIN_EXTRA = "pip install cdkernels[train]"


def _sklearn_load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("digits is scikit-learn's embedded dataset and scikit-learn is not "
                        f"installed: {TRAIN_EXTRA} (or pip install scikit-learn)") from None
    return load_digits


def check_available(name: str) -> None:
    """Fail early (DataError) when ``name`` needs an optional package that is missing, before
    a command line run builds anything. Data files are checked by :func:`load`."""
    if name == "digits":
        _sklearn_load_digits()


def load_digits_arrays():
    load_digits = _sklearn_load_digits()
    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # values 0..16
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return (x[tr], y[tr]), (x[te], y[te])


# -- entry point ---------------------------------------------------------------------------------

_HOWTO = {
    "fashion-mnist": "install the Debian package (`apt-get install dataset-fashion-mnist`, files "
                     "in /usr/share/datasets/fashion-mnist) or pass --data-dir DIR holding "
                     "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                     "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz",
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
               "extract it and pass --data-dir DIR (DIR or DIR/cifar-10-batches-py holding "
               "data_batch_1..5 and test_batch)",
    "cifar100": "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html,"
                " extract it and pass --data-dir DIR (DIR or DIR/cifar-100-python holding train "
                "and test)",
}


def _split_val(x: np.ndarray, y: np.ndarray, val_fraction: float):
    perm = np.random.default_rng(SPLIT_SEED + 1).permutation(len(y))
    n_val = int(round(len(y) * val_fraction))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_val >= len(y):
        raise DataError(f"val_fraction={val_fraction} leaves no training images")
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return (x[tr], y[tr]), (x[va], y[va])


def load(name: str, data_dir: Optional[str] = None, device="cpu", val_fraction: float = 0.1,
         limit_train: Optional[int] = None) -> ImageData:
    """Load dataset ``name`` (one of :data:`DATASETS`) onto ``device``.

    ``val_fraction`` of the training set (a fixed, seed-independent subset) becomes the
    validation split; ``limit_train`` keeps only the first N remaining training images.
    Missing or malformed files raise :class:`DataError` saying what was looked for and how to
    get it.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir!r} is not a directory"
                        + (f"; to get {name}: {_HOWTO[name]}" if name in _HOWTO else ""))
    classes = None
    if name == "digits":
        (trx, try_), (tex, tey) = load_digits_arrays()
        num_classes, scale, pad, flip = 10, 1.0 / 16.0, 1, False
    elif name == "fashion-mnist":
        folders = [data_dir] if data_dir else [d for d in FASHION_MNIST_DIRS]
        errors = []
        for folder in folders:
            if not os.path.isdir(folder):
                errors.append(f"{folder}: no such directory")
                continue
            try:
                (trx, try_), (tex, tey) = load_idx_folder(folder)
                break
            except DataError as e:
                errors.append(str(e))
                if data_dir or os.listdir(folder):
                    raise DataError(f"fashion-mnist: {e}; to get it: {_HOWTO[name]}") from None
        else:
            raise DataError(f"fashion-mnist not found (looked in {', '.join(folders)}: "
                            f"{'; '.join(errors)}); {_HOWTO[name]}")
        num_classes, scale, pad, flip = 10, 1.0 / 255.0, 2, True
        classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
    else:
        if not data_dir:
            raise DataError(f"{name} needs --data-dir; {_HOWTO[name]}")
        nc = 10 if name == "cifar10" else 100
        try:
            (trx, try_), (tex, tey) = load_cifar_folder(data_dir, nc)
        except DataError as e:
            raise DataError(f"{name}: {e}; to get it: {_HOWTO[name]}") from None
        num_classes, scale, pad, flip = nc, 1.0 / 255.0, 4, True
    (trx, try_), (vax, vay) = _split_val(trx, try_, val_fraction)
    if limit_train is not None:
        if limit_train < 1:
            raise DataError(f"limit_train must be >= 1, got {limit_train}")
        trx, try_ = trx[:limit_train], try_[:limit_train]
    xf = torch.from_numpy(trx).to(torch.float64) * scale
    mean = xf.mean(dim=(0, 2, 3)).float()
    std = xf.std(dim=(0, 2, 3)).float().clamp_min(1e-3)
    dev = torch.device(device)
    mk = lambda x, y: Split(torch.from_numpy(np.ascontiguousarray(x)).to(dev),  # noqa: E731
                            torch.from_numpy(np.ascontiguousarray(y)).to(dev))
    return ImageData(name, mk(trx, try_), mk(vax, vay), mk(tex, tey), num_classes, scale,
                     mean.to(dev), std.to(dev), pad, flip, classes,
                     {"data_dir": data_dir, "val_fraction": val_fraction,
                      "limit_train": limit_train})
