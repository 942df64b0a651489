"""Fashion-MNIST from idx files (the Debian package ``dataset-fashion-mnist``), in numpy.

The idx format is a big-endian header ``0x00 0x00 <dtype> <ndim>``, ``ndim`` uint32 sizes,
then the raw array; the files may be gzipped. Images are returned as float32 tensors of shape
``(N, 1, 28, 28)`` standardized with the training-set mean and std, labels as int64.

Example::

    train, test = load_fashion_mnist()
    train.images.shape, test.labels.shape  # (60000, 1, 28, 28), (10000,)
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training set, pixel values in [0, 1]

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(RuntimeError):
    """The data set is missing or unreadable; the message is one line meant for the user."""


@dataclass
class Split:
    """Images ``(N, 1, 28, 28)`` float32 (standardized) and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (plain or gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != dtype.itemsize * int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, size does not match")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def find_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def resolve_dir(data_dir: str | os.PathLike | None) -> Path:
    """The directory that holds the four idx files, or a :class:`DataError` saying what to do."""
    candidates = [Path(data_dir)] if data_dir is not None else [Path(d) for d in DEFAULT_DIRS]
    for directory in candidates:
        if all(find_file(directory, stem) for pair in FILES.values() for stem in pair):
            return directory
    where = str(candidates[0]) if data_dir is not None else " or ".join(DEFAULT_DIRS)
    raise DataError(
        f"Fashion-MNIST idx files not found in {where}: install them with "
        f"`{INSTALL_HINT}` (as root), or pass --data DIR holding "
        f"{', '.join(s for p in FILES.values() for s in p)} (.gz or not)"
    )


def load_split(directory: Path, which: str) -> Split:
    """One split (``"train"`` or ``"test"``) as standardized tensors."""
    images_stem, labels_stem = FILES[which]
    images = read_idx(find_file(directory, images_stem))
    labels = read_idx(find_file(directory, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory}: {which} images {images.shape} and labels {labels.shape} do not match"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - MEAN) / STD
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> tuple[Split, Split]:
    """``(train, test)`` Fashion-MNIST splits; ``data_dir=None`` looks in the Debian path."""
    directory = resolve_dir(data_dir)
    return load_split(directory, "train"), load_split(directory, "test")


def carve_validation(train: Split, n_val: int, seed: int = 1234) -> tuple[Split, Split]:
    """Split ``train`` into ``(fit, validation)`` by a fixed random permutation.

    The validation images come from the training set only, so a learning rate chosen on
    them never sees the test set.
    """
    if not 0 < n_val < len(train):
        raise ValueError(f"n_val must be in (0, {len(train)}), got {n_val}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val])


def subsample(split: Split, n: int | None, seed: int = 0) -> Split:
    """A class-mixed subset of ``n`` examples (a fixed random choice); ``None`` keeps all."""
    if n is None or n >= len(split):
        return split
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(perm[:n])
