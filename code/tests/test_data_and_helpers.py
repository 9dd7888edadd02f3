import gzip
import struct

import numpy as np
import pytest

from conftest import write_tiny_cifar10
from implicit_layers.config import quick_mode
from implicit_layers.notebook import GLUE_MIME_PREFIX
from implicit_layers.datasets import (
    CIFAR10_TEST_FILE,
    DENSITIES_2D,
    MNIST_FILES,
    load_cifar10,
    load_digits,
    load_mnist,
    sample_density_2d,
)


def test_digits_ship_offline_and_split_reproducibly():
    split = load_digits(test_fraction=0.25, seed=3)
    assert split.x_train.shape[1] == 64 and split.x_train.dtype == np.float32
    assert len(split.x_train) + len(split.x_test) == 1797
    assert len(split.x_test) == round(0.25 * 1797)
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert set(np.unique(split.y_train)) == set(range(10))
    again = load_digits(test_fraction=0.25, seed=3)
    np.testing.assert_array_equal(split.y_test, again.y_test)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 28, 28)),
        "y_train": rng.integers(0, 10, 6),
        "x_test": rng.integers(0, 256, (4, 28, 28)),
        "y_test": rng.integers(0, 10, 4),
    }
    source = tmp_path / "mirror"
    source.mkdir()
    for key, name in MNIST_FILES.items():
        write_idx(source / name, arrays[key])
    return source, arrays


def test_mnist_reads_local_idx_files(tiny_mnist):
    source, arrays = tiny_mnist
    split = load_mnist(source)
    assert split.x_train.shape == (6, 784) and split.x_test.shape == (4, 784)
    np.testing.assert_allclose(split.x_train[2], arrays["x_train"][2].reshape(-1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(split.y_test, arrays["y_test"])


def test_mnist_downloads_only_when_asked(tiny_mnist, tmp_path):
    source, arrays = tiny_mnist
    target = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_mnist(target)
    split = load_mnist(target, download=True, base_url=source.as_uri())
    assert sorted(p.name for p in target.iterdir()) == sorted(MNIST_FILES.values())
    np.testing.assert_array_equal(split.y_train, arrays["y_train"])


def test_mnist_rejects_corrupt_files(tiny_mnist):
    source, _ = tiny_mnist
    with gzip.open(source / MNIST_FILES["y_test"], "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_mnist(source)
    write_idx(source / MNIST_FILES["y_test"], np.zeros(3))  # 4 test images but 3 labels
    with pytest.raises(ValueError, match="do not hold images"):
        load_mnist(source)


@pytest.fixture
def tiny_cifar10(tmp_path):
    """The six binary CIFAR-10 files with 2 records each (3 in the test file)."""
    return tmp_path, write_tiny_cifar10(tmp_path, train_per_file=2, test_count=3)


def test_cifar10_reads_local_binary_files(tiny_cifar10):
    root, contents = tiny_cifar10
    split = load_cifar10(root)
    assert split.x_train.shape == (10, 3, 32, 32) and split.x_test.shape == (3, 3, 32, 32)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int64
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    # The training images in file order: data_batch_2's second record is the fourth image.
    labels, pixels = contents["data_batch_2.bin"]
    assert split.y_train[3] == labels[1]
    np.testing.assert_allclose(split.x_train[3], pixels[1] / 255.0, rtol=1e-6)
    assert split.x_train[3, 2, 31, 0] == np.float32(pixels[1, 2, 31, 0] / 255.0)  # blue plane, last row, first column
    np.testing.assert_array_equal(split.y_test, contents[CIFAR10_TEST_FILE][0])
    np.testing.assert_allclose(split.x_test, contents[CIFAR10_TEST_FILE][1] / 255.0, rtol=1e-6)


def test_cifar10_never_downloads_and_names_the_files(tiny_cifar10, tmp_path):
    root, _ = tiny_cifar10
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin.*test_batch.bin") as missing_folder:
        load_cifar10(tmp_path / "nowhere")
    assert "nowhere" in str(missing_folder.value)
    (root / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['data_batch_3.bin'\]"):
        load_cifar10(root)


def test_cifar10_rejects_truncated_and_foreign_files(tiny_cifar10):
    root, _ = tiny_cifar10
    whole = (root / CIFAR10_TEST_FILE).read_bytes()
    (root / CIFAR10_TEST_FILE).write_bytes(whole[:-100])
    with pytest.raises(ValueError, match="test_batch.bin.*not a positive whole number of 3073-byte"):
        load_cifar10(root)
    (root / CIFAR10_TEST_FILE).write_bytes(bytes([10]) + whole[1:])
    with pytest.raises(ValueError, match="label 10 outside 0-9"):
        load_cifar10(root)


def test_densities_2d_are_reproducible_and_centred():
    for name in DENSITIES_2D:
        points = sample_density_2d(name, 2000, seed=3)
        assert points.shape == (2000, 2) and points.dtype == np.float64
        np.testing.assert_array_equal(points, sample_density_2d(name, 2000, seed=3))
        assert not np.array_equal(points, sample_density_2d(name, 2000, seed=4))
        assert np.all(np.abs(points.mean(axis=0)) < 0.15), name
        assert np.all((0.3 < points.std(axis=0)) & (points.std(axis=0) < 2.0)), name


def test_densities_2d_have_their_shapes():
    rings = np.linalg.norm(sample_density_2d("rings", 3000), axis=1)
    assert np.all(np.abs(rings[:, None] - np.array([0.75, 1.5, 2.25])).min(axis=1) < 0.5)
    # Points fall on the rings in proportion to their lengths, 1 : 2 : 3.
    nearest = np.abs(rings[:, None] - np.array([0.75, 1.5, 2.25])).argmin(axis=1)
    np.testing.assert_allclose(np.bincount(nearest) / 3000, [1 / 6, 2 / 6, 3 / 6], atol=0.03)

    board = sample_density_2d("checkerboard", 3000)
    assert np.all(np.abs(board) <= 2.0)
    assert np.all(np.floor(board).sum(axis=1) % 2 == 0)

    mixture = sample_density_2d("eight_gaussians", 3000)
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    distance = np.linalg.norm(mixture[:, None, :] - centres[None], axis=2)
    assert np.all(distance.min(axis=1) < 0.9)
    np.testing.assert_allclose(np.bincount(distance.argmin(axis=1)) / 3000, np.full(8, 1 / 8), atol=0.03)

    # Without noise each moon is a unit half circle: the centred points lie within noise of one of them.
    moons = sample_density_2d("two_moons", 3000) + np.array([0.5, 0.25])
    upper = np.abs(np.linalg.norm(moons, axis=1) - 1)
    lower = np.abs(np.linalg.norm(moons - np.array([1.0, 0.5]), axis=1) - 1)
    assert np.all(np.minimum(upper, lower) < 0.5)
    assert np.median(np.minimum(upper, lower)) < 0.1

    pinwheel = sample_density_2d("pinwheel", 3000)
    assert 1.0 < np.median(np.linalg.norm(pinwheel, axis=1)) < 2.0


def test_densities_2d_name_their_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of.*'spiral'"):
        sample_density_2d("spiral", 10)
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            sample_density_2d("rings", n)


@pytest.mark.parametrize("value, expected", [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("", False)])
def test_quick_mode_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("BOOK_QUICK", value)
    assert quick_mode() is expected


def test_glue_works_without_myst_nb(monkeypatch, capsys):
    import importlib.util

    from implicit_layers.notebook import glue

    real_find_spec = importlib.util.find_spec

    def no_myst_nb(name, *args, **kwargs):
        return None if name == "myst_nb" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_myst_nb)
    glue("answer", 42)
    glue("hidden", 7, display=False)
    assert capsys.readouterr().out.split() == ["42"]


def _array_scalars():
    import jax.numpy as jnp
    import torch

    return [(np.float64(0.5), 0.5), (np.int64(7), 7), (np.array(2.5), 2.5), (torch.tensor(0.25), 0.25),
            (jnp.asarray(1.5), 1.5)]


@pytest.mark.parametrize("display", [True, False])
@pytest.mark.parametrize("value, plain", [(42, 42), (3.25e-7, 3.25e-7), ("a string", "a string")] + _array_scalars())
def test_glue_writes_what_myst_nb_glue_writes(monkeypatch, value, plain, display):
    """The build reads glued values the way MyST-NB writes them; ours must write the same outputs, with array
    scalars written as the Python numbers they hold (MyST-NB would write their repr, np.float64(0.5), which the
    build's number formats cannot read)."""
    import IPython.display
    import myst_nb.ext.glue

    from implicit_layers.notebook import glue

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *args, **kwargs: shown.append((args, kwargs)))
    monkeypatch.setattr(myst_nb.ext.glue, "ipy_display", lambda *args, **kwargs: shown.append((args, kwargs)))
    glue("name", value, display=display)
    myst_nb.ext.glue.glue("name", plain, display=display)
    ours, theirs = shown
    assert ours == theirs
    assert ("text/plain" in ours[0][0]) is display
    if isinstance(plain, float):
        assert float(ours[0][0][("" if display else GLUE_MIME_PREFIX) + "text/plain"]) == plain
