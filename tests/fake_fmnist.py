"""A learnable synthetic Fashion-MNIST in the idx format, for the comparison studies' tests.

Ten random blocky 28x28 templates, one per class, plus noise, written as the four idx files
(gzipped by default) that ``comparisons.data.load_fashion_mnist`` reads.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

__all__ = ["fake_fashion_mnist", "write_idx"]


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)


def fake_fashion_mnist(directory: Path, n_train: int = 600, n_test: int = 300) -> Path:
    """Learnable fake data: one random blocky template per class, plus noise."""
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 2, (10, 7, 7)).repeat(4, axis=1).repeat(4, axis=2) * 160
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        noise = rng.integers(0, 90, (n, 28, 28))
        images = (templates[labels] + noise).astype(np.uint8)
        write_idx(directory / f"{stem}-images-idx3-ubyte", images)
        write_idx(directory / f"{stem}-labels-idx1-ubyte", labels)
    return directory
