"""Data sets for the chapters, as NumPy arrays, offline by default.

The digits of scikit-learn ship with the package and need no network. MNIST is read from a local folder and
downloaded only when the caller opts in with ``download=True``. CIFAR-10 is read from a local folder only. The 2-D
densities that continuous normalizing flows learn are generated, from a seed.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_BASE_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{k}.bin" for k in range(1, 6))
CIFAR10_TEST_FILE = "test_batch.bin"
# A record of the binary CIFAR-10 files is a label byte, then the red, green and blue 32x32 planes row by row.
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
DENSITIES_2D = ("two_moons", "rings", "checkerboard", "eight_gaussians", "pinwheel")
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


class Split(NamedTuple):
    """A train/test split: images as float32 in [0, 1] (flattened for the digits and MNIST, (N, 3, 32, 32) for
    CIFAR-10) and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Load scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), offline.

    Parameters
    ----------
    test_fraction : float
        Fraction of the images held out for testing, in (0, 1).
    seed : int
        Seed of the shuffle that splits the images.

    Returns
    -------
    Split
        Images of shape (N, 64) scaled to [0, 1] and their labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits

    images, labels = sklearn_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    x = (images / 16.0).astype(np.float32)
    y = labels.astype(np.int64)
    return Split(x[train], y[train], x[test], y[test])


def sample_density_2d(name: str, n: int, *, seed: int = 0) -> np.ndarray:
    """Draw ``n`` points of one of the 2-D densities in ``DENSITIES_2D``, the same points for the same arguments.

    Each is centred near the origin with a spread of order one, the scale a standard normal base distribution
    suits.

    - ``"two_moons"``: two interleaved half circles of radius 1, Gaussian noise of standard deviation 0.1.
    - ``"rings"``: three concentric circles of radii 0.75, 1.5 and 2.25, points in proportion to their length,
      radial noise of standard deviation 0.08.
    - ``"checkerboard"``: uniform on the eight dark squares of a 4 x 4 board covering [-2, 2]^2.
    - ``"eight_gaussians"``: an equal mixture of eight Gaussians of standard deviation 0.15 centred on a circle of
      radius 2.
    - ``"pinwheel"``: five arms, each a Gaussian blob stretched along the radius and bent by a rotation that grows
      with the distance from the centre.

    Parameters
    ----------
    name : str
        One of ``DENSITIES_2D``.
    n : int
        Number of points, at least 1.
    seed : int
        Seed of the NumPy generator that draws them.

    Returns
    -------
    np.ndarray
        Shape (n, 2), float64.
    """
    if name not in DENSITIES_2D:
        raise ValueError(f"name must be one of {DENSITIES_2D}, got {name!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    if name == "two_moons":
        angle = np.pi * rng.random(n)
        lower = rng.random(n) < 0.5
        # The lower moon is the upper one turned half a circle and shifted by (1, -0.5); the pair is then centred.
        x = np.where(lower, 1.0 - np.cos(angle), np.cos(angle)) - 0.5
        y = np.where(lower, 0.5 - np.sin(angle), np.sin(angle)) - 0.25
        points = np.stack([x, y], axis=1) + 0.1 * rng.standard_normal((n, 2))
    elif name == "rings":
        radii = np.array([0.75, 1.5, 2.25])
        radius = rng.choice(radii, size=n, p=radii / radii.sum()) + 0.08 * rng.standard_normal(n)
        angle = 2.0 * np.pi * rng.random(n)
        points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    elif name == "checkerboard":
        # The dark squares are those whose corner (i, j) in {-2, -1, 0, 1}^2 has an even i + j.
        corners = np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0], dtype=float)
        points = corners[rng.integers(len(corners), size=n)] + rng.random((n, 2))
    elif name == "eight_gaussians":
        angle = 2.0 * np.pi * rng.integers(8, size=n) / 8.0
        centres = 2.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        points = centres + 0.15 * rng.standard_normal((n, 2))
    else:
        arm = rng.integers(5, size=n)
        radial = 1.0 + 0.3 * rng.standard_normal(n)
        tangential = 0.08 * rng.standard_normal(n)
        angle = 2.0 * np.pi * arm / 5.0 + 0.25 * np.exp(radial)
        cos, sin = np.cos(angle), np.sin(angle)
        points = 1.5 * np.stack([cos * radial - sin * tangential, sin * radial + cos * tangential], axis=1)
    return points.astype(np.float64)


def load_mnist(root: str | Path, download: bool = False, base_url: str = MNIST_BASE_URL) -> Split:
    """Load MNIST (60,000 training and 10,000 test images of 28x28 pixels) from ``root``.

    Parameters
    ----------
    root : str or Path
        Folder holding the four gzipped IDX files (``train-images-idx3-ubyte.gz`` and so on).
    download : bool
        Fetch the missing files from ``base_url`` into ``root``. Off by default: nothing is downloaded unless
        the caller asks.
    base_url : str
        Where the files are fetched from when ``download`` is True.

    Returns
    -------
    Split
        Images of shape (N, 784) scaled to [0, 1] and their labels.

    Raises
    ------
    FileNotFoundError
        If files are missing and ``download`` is False.
    ValueError
        If a file is not a valid IDX file of the expected kind.
    """
    root = Path(root)
    missing = [name for name in MNIST_FILES.values() if not (root / name).exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"MNIST files {missing} are not in {str(root)!r}; pass download=True to fetch them from {base_url}"
        )
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _download(base_url.rstrip("/") + "/" + name, root / name)
    arrays = {key: _read_idx(root / name) for key, name in MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} files in {str(root)!r} do not hold images of shape (N, H, W) and N labels: "
                f"got {images.shape} and {labels.shape}"
            )
    return Split(
        _scaled_flat(arrays["x_train"]),
        arrays["y_train"].astype(np.int64),
        _scaled_flat(arrays["x_test"]),
        arrays["y_test"].astype(np.int64),
    )


def load_cifar10(root: str | Path) -> Split:
    """Load CIFAR-10 (50,000 training and 10,000 test color images of 32x32 pixels, 10 classes) from ``root``.

    Reads the binary version of the data set (the folder ``cifar-10-batches-bin`` of ``cifar-10-binary.tar.gz``
    from https://www.cs.toronto.edu/~kriz/cifar.html), whose files are sequences of records of one label byte
    followed by 3,072 pixel bytes, channel by channel. Nothing is downloaded: the data set is large, and a
    chapter uses it only when the reader has the files.

    Parameters
    ----------
    root : str or Path
        Folder holding ``data_batch_1.bin`` to ``data_batch_5.bin`` and ``test_batch.bin``.

    Returns
    -------
    Split
        Images of shape (N, 3, 32, 32) scaled to [0, 1] and their labels, 0 to 9, in file order.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message names the folder and the files it expects.
    ValueError
        If a file's size is not a whole number of records, or a label is not one of 0 to 9.
    """
    root = Path(root)
    expected = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    missing = [name for name in expected if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files {missing} are not in {str(root)!r}, which must hold the binary version's "
            f"{', '.join(expected)} (the folder cifar-10-batches-bin of cifar-10-binary.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html); nothing is downloaded"
        )
    train = [_read_cifar10_batch(root / name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar10_batch(root / CIFAR10_TEST_FILE)
    return Split(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        x_test,
        y_test,
    )


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{str(path)!r} has {data.size} bytes, not a positive whole number of {CIFAR10_RECORD_BYTES}-byte "
            "CIFAR-10 records (a label byte and 3,072 pixel bytes): is it truncated, or not the binary version?"
        )
    records = data.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{str(path)!r} has a label {labels.max()} outside 0-9: it is not a CIFAR-10 file")
    images = (records[:, 1:].reshape(-1, 3, 32, 32) / np.float32(255.0)).astype(np.float32)
    return images, labels


def _scaled_flat(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32)


def _download(url: str, target: Path) -> None:
    partial = target.with_suffix(target.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    partial.replace(target)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{str(path)!r} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{str(path)!r} holds {body.size} values, its header promises shape {shape}")
    return body.reshape(shape)
