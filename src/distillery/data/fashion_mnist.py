"""Fashion-MNIST (Xiao, Rasul, Vollgraf, 2017): 60,000 + 10,000 28x28 greyscale images, 10 classes.

Looked up, in order, in: an explicit ``root``; ``$DISTILLERY_DATA`` (or its ``fashion-mnist``
sub-directory); ``~/.cache/distillery/fashion-mnist``; ``/usr/share/datasets/fashion-mnist`` (Debian
package ``dataset-fashion-mnist``). If absent and downloads are allowed, the four files are fetched
from the official source into the cache directory.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distillery.errors import DataNotFoundError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "fashion-mnist"


def candidate_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root).expanduser())
    env = os.environ.get("DISTILLERY_DATA")
    if env:
        dirs += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    dirs += [cache_dir(), SYSTEM_DIR]
    return dirs


def find_files(root: str | os.PathLike | None = None) -> Path | None:
    for d in candidate_dirs(root):
        if all((d / f).is_file() for f in FILES.values()):
            return d
    return None


def download(target: Path, timeout: float = 30.0) -> Path:
    """Fetch the four files into ``target`` (each written to a temporary file, then renamed)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        dest = target / name
        if dest.is_file():
            continue
        with urllib.request.urlopen(URL + name, timeout=timeout) as response:
            with tempfile.NamedTemporaryFile(dir=target, delete=False, suffix=".part") as tmp:
                shutil.copyfileobj(response, tmp)
        os.replace(tmp.name, dest)
    return target


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (unsigned-byte data) into a NumPy array of its declared shape."""
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataNotFoundError(
            f"{path} is not an unsigned-byte IDX file (bad magic number); delete it and retry"
        )
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataNotFoundError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), file holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist_arrays(
    root: str | os.PathLike | None = None, allow_download: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [60000, 1, 28, 28], y_train, x_test [10000, 1, 28, 28], y_test)``, x in [0, 1]."""
    directory = find_files(root)
    if directory is None and allow_download:
        try:
            directory = download(cache_dir())
        except OSError as exc:  # URLError is an OSError
            raise DataNotFoundError(_missing_message(root, f"the download failed ({exc})")) from None
    if directory is None:
        raise DataNotFoundError(_missing_message(root, "downloads are disabled (data.download=false)"))
    arrays = {k: read_idx(directory / f) for k, f in FILES.items()}
    x_train = torch.from_numpy(arrays["train_images"].copy()).float().div_(255.0).unsqueeze(1)
    x_test = torch.from_numpy(arrays["test_images"].copy()).float().div_(255.0).unsqueeze(1)
    y_train = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    y_test = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    return x_train, y_train, x_test, y_test


def _missing_message(root: str | os.PathLike | None, why: str) -> str:
    looked = "\n".join(f"  - {d}" for d in candidate_dirs(root))
    return (
        f"Fashion-MNIST not found, and {why}.\nLooked for {', '.join(FILES.values())} in:\n{looked}\n"
        "Install it with:  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu), or download the\n"
        f"four files from {URL} into {cache_dir()}, or point $DISTILLERY_DATA (or data.root=...) at them."
    )
