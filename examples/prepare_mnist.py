"""Convert the bundled MNIST test set (IDX, gzip) to the CSV layout the seed example reads.

Writes ``label,pixel0,...,pixel783`` rows (raw 0-255 integers, no header), as sparktorch 0.2.0's
example CSV was laid out:

- ``mnist_train.csv``: the first 8,000 images (training);
- ``mnist_test.csv``: the last 2,000 images (held-out evaluation).

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, distributed under
CC BY-SA 3.0 (see ``examples/data/README.md``).

Usage: ``python examples/prepare_mnist.py [OUT_DIR]`` (default: ``examples/data``). Files that
already exist and are newer than the sources are left alone.
"""

from __future__ import annotations

import gzip
import logging
import struct
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("sparktorch.examples")

DATA = Path(__file__).resolve().parent / "data"
IMAGES = DATA / "t10k-images-idx3-ubyte.gz"
LABELS = DATA / "t10k-labels-idx1-ubyte.gz"
TRAIN_ROWS = 8000


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one gzip-compressed IDX file, checking its magic number and dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    got, = struct.unpack(">I", data[:4])
    if got != magic:
        raise ValueError(f"{path}: magic {got}, expected {magic}")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes of data, header says {dims}")
    return body.reshape(dims)


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 images as (10000, 784) uint8 and their labels as (10000,) uint8."""
    images = read_idx(IMAGES, 2051).reshape(-1, 28 * 28)
    labels = read_idx(LABELS, 2049)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return images, labels


def write_csv(path: Path, labels: np.ndarray, images: np.ndarray) -> None:
    """Write ``label,pixels...`` rows atomically (temp file, then rename)."""
    rows = np.concatenate([labels[:, None], images], axis=1).astype(np.int64)
    tmp = path.with_suffix(".csv.tmp")
    np.savetxt(tmp, rows, fmt="%d", delimiter=",")
    tmp.replace(path)


def prepare(out_dir: Path = DATA) -> tuple[Path, Path]:
    """Make ``mnist_train.csv`` and ``mnist_test.csv`` in ``out_dir`` unless up to date."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / "mnist_train.csv", out_dir / "mnist_test.csv"
    newest_source = max(IMAGES.stat().st_mtime, LABELS.stat().st_mtime)
    if all(p.exists() and p.stat().st_mtime >= newest_source for p in (train, test)):
        return train, test
    images, labels = load_mnist()
    write_csv(train, labels[:TRAIN_ROWS], images[:TRAIN_ROWS])
    write_csv(test, labels[TRAIN_ROWS:], images[TRAIN_ROWS:])
    log.info("wrote %s (%d rows) and %s (%d rows)", train, TRAIN_ROWS, test, len(labels) - TRAIN_ROWS)
    return train, test


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(Path(sys.argv[1]) if len(sys.argv) > 1 else DATA)
