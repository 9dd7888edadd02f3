import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock

from implicit_layers.datasets import CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES

REPO = Path(__file__).resolve().parents[2]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core; a second intra-op thread per worker would only compete for them.
    torch.set_num_threads(1)


def tanh_problem(batch=5, n=8, scale=0.5, dtype=torch.float64, device="cpu", seed=0):
    """A map z -> tanh(W z + x) whose W has spectral norm ``scale`` (a contraction when scale < 1)."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=generator, dtype=torch.float64)
    W = (scale * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype=dtype, device=device)
    x = torch.randn(batch, n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return W, x


@pytest.fixture
def problem():
    return tanh_problem()


def write_tiny_cifar10(folder: Path, train_per_file: int, test_count: int) -> dict:
    """Write the six binary CIFAR-10 files with random records (a label byte, then 3,072 pixel bytes, the red
    plane first) into ``folder``; return each file's (labels, pixels)."""
    rng = np.random.default_rng(0)
    contents = {}
    for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
        count = test_count if name == CIFAR10_TEST_FILE else train_per_file
        labels, pixels = rng.integers(0, 10, count), rng.integers(0, 256, (count, 3, 32, 32))
        records = np.concatenate([labels[:, None], pixels.reshape(count, -1)], axis=1).astype(np.uint8)
        (folder / name).write_bytes(records.tobytes())
        contents[name] = labels, pixels
    return contents


def book_config() -> dict:
    return yaml.safe_load((REPO / "_config.yml").read_text())


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """``make book`` into a temporary folder, with execution off (the chapters' execution is
    tested above). Returns the ``_build`` folder holding ``html`` and ``jupyter``.

    Each pytest-xdist worker has a session of its own: the first to ask builds the book into a folder
    that all workers share, and the others wait for it and use that build, or its failure."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder above the workers' own temporary folders
    out = shared / "book"
    with FileLock(shared / "book.lock"):
        if not out.is_dir():
            out.mkdir()
            result = _build_book_without_execution(out)
            (out / "build.log").write_text(f"{result.returncode}\n{result.stdout}{result.stderr}")
    status, log = (out / "build.log").read_text().split("\n", 1)
    assert status == "0", log[-6000:]
    return out / "_build"


def _build_book_without_execution(out: Path) -> subprocess.CompletedProcess:
    config = book_config()
    config["execute"]["execute_notebooks"] = "off"
    sphinx = config["sphinx"]
    # Relative extension paths are resolved next to the configuration file, now in `out`.
    sphinx["local_extensions"] = {
        name: str((REPO / path).resolve()) for name, path in sphinx["local_extensions"].items()
    }
    # Without execution there is nothing to glue; the real build checks glued values.
    suppressed = sphinx["config"].setdefault("suppress_warnings", [])
    suppressed += ["mystnb.glue", "mystnb.glue_ref"]
    config_path = out / "_config.yml"
    config_path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        ["make", "book", f"OUTPUT={out}", f"JB_CONFIG={config_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BOOK_QUICK": "1"},
    )
