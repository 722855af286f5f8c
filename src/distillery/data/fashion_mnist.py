"""Fashion-MNIST (Xiao, Rasul, Vollgraf, 2017): 60,000 + 10,000 28x28 greyscale images, 10 classes.

Looked up in: an explicit ``root`` (``data.root``: then the files must be there); else, in order,
``$DISTILLERY_DATA`` (or its ``fashion-mnist`` sub-directory), ``~/.cache/distillery/fashion-mnist``,
``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``). If absent and
downloads are allowed, the four files are fetched over HTTPS from the official repository into the
cache directory.

Every file is checked before use: its gzip stream, the IDX header (magic number, 3 dims of 28 x 28
for images, 1 for labels), its length, labels in 0..9, as many labels as images. The files of the
two places this module fills or knows (the download cache and the Debian package) are also checked
against the official contents: a download against the MD5 the dataset's authors publish for each
``.gz`` file (it is written to a temporary file and renamed into place only when it matches), and
the uncompressed contents against their SHA-256 (:data:`SHA256`; Debian recompresses the files, so
their ``.gz`` bytes differ while the contents are the same). Folders a user names hold any IDX files
of the right structure (a subsample, a test fixture).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zlib
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
# The official repository (HTTPS); the README's S3 links are plain HTTP.
URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
# MD5 of each .gz file as published by the authors (README of zalandoresearch/fashion-mnist).
MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# SHA-256 of each file's uncompressed IDX contents (the same for the official .gz files and Debian's
# recompressed copies).
SHA256 = {
    "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SHAPE = (28, 28)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "distillery" / "fashion-mnist"


def candidate_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Where the files are looked for: ``root`` alone when given, else the default places in order."""
    if root is not None:
        return [Path(root).expanduser()]
    dirs: list[Path] = []
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


def _official(directory: Path) -> bool:
    """Whether ``directory`` is one this module fills (the download cache) or knows (Debian's): its
    files must then be the official ones."""
    here = directory.expanduser().resolve()
    return here in (cache_dir().expanduser().resolve(), SYSTEM_DIR.resolve())


def download(target: Path, timeout: float = 30.0) -> Path:
    """Fetch the missing files into ``target`` over HTTPS, each checked against its published MD5.

    Each file is streamed to a temporary file beside its destination and renamed into place only
    when its MD5 matches; a file that does not match is deleted and reported.

    Raises:
        DataNotFoundError: a downloaded file does not match its published checksum.
        OSError: the download itself failed (no network, HTTP error).
    """
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        dest = target / name
        if dest.is_file():
            continue
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL + name, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != MD5[name]:
                raise DataNotFoundError(
                    f"the downloaded {URL + name} does not match its published checksum (MD5 "
                    f"{digest.hexdigest()}, expected {MD5[name]}); the download was deleted. Retry later, or "
                    f"download the file yourself into {target}"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def repair_hint(directory: Path) -> str:
    """How to mend a damaged file of ``directory``: what can be done there depends on who fills it."""
    here = directory.expanduser().resolve()
    if here == cache_dir().expanduser().resolve():
        return "delete it: the missing file is downloaded again"
    if here == SYSTEM_DIR.resolve():
        return "reinstall the package: sudo apt-get install --reinstall dataset-fashion-mnist"
    return "replace it with an intact copy, or point data.root (or $DISTILLERY_DATA) at a folder with intact files"


def _decompress(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except PermissionError:
        raise DataNotFoundError(f"{path} cannot be read (permission denied); fix its permissions") from None
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataNotFoundError(
            f"{path} is not a readable gzip file, or it is truncated ({exc}); {repair_hint(path.parent)}"
        ) from None


def read_idx(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """Parse a gzipped IDX file (unsigned-byte data) into a NumPy array of its declared shape.

    Args:
        path: the ``.gz`` file.
        expected_sha256: the SHA-256 its uncompressed contents must have (None: not checked).

    Raises:
        DataNotFoundError: the file is not gzip, is truncated, has a bad header or length, or its
            contents differ from ``expected_sha256``; the message names the file and the fix.
    """
    path = Path(path)
    data = _decompress(path)
    fix = repair_hint(path.parent)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataNotFoundError(f"{path} is not an unsigned-byte IDX file (bad magic number); {fix}")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataNotFoundError(
            f"{path} is truncated or corrupt: its header declares {ndim} dims but the file ends first; {fix}"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataNotFoundError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), file holds "
            f"{len(data) - offset}; {fix}"
        )
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise DataNotFoundError(
                f"{path} is not the official Fashion-MNIST file: the SHA-256 of its contents is {digest}, "
                f"expected {expected_sha256}; {fix}"
            )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _check_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Images ``[N, 28, 28]`` and ``N`` labels in 0..9."""
    img_path = directory / FILES[f"{split}_images"]
    lab_path = directory / FILES[f"{split}_labels"]
    fix = repair_hint(directory)
    if images.ndim != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise DataNotFoundError(
            f"{img_path} holds an array of shape {list(images.shape)}, not Fashion-MNIST images [N, 28, 28]; {fix}"
        )
    if labels.ndim != 1:
        raise DataNotFoundError(
            f"{lab_path} holds an array of shape {list(labels.shape)}, not a label vector [N]; {fix}"
        )
    if len(labels) != len(images):
        raise DataNotFoundError(
            f"{lab_path} holds {len(labels)} labels but {img_path} holds {len(images)} images; the two files "
            f"do not belong together: {fix}"
        )
    if len(images) == 0:
        raise DataNotFoundError(f"{img_path} holds no images; {fix}")
    if labels.max() >= len(CLASS_NAMES):
        raise DataNotFoundError(
            f"{lab_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..{len(CLASS_NAMES) - 1}: {fix}"
        )


def load_fashion_mnist_arrays(
    root: str | os.PathLike | None = None, allow_download: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [60000, 1, 28, 28], y_train, x_test [10000, 1, 28, 28], y_test)``, x in [0, 1].

    Raises:
        DataNotFoundError: the files are not found (and cannot be downloaded), or a file is damaged,
            malformed or (in the download cache or Debian's folder) not the official one.
    """
    if root is not None:
        directory = Path(root).expanduser()
        missing = [f for f in FILES.values() if not (directory / f).is_file()]
        if missing:
            if not directory.exists():
                where = "the folder does not exist"
            elif not directory.is_dir():
                where = "it is a file, not a folder"
            else:
                where = f"the folder lacks {', '.join(missing)}"
            raise DataNotFoundError(
                f"data.root={root}: {where}. Put the four Fashion-MNIST files "
                f"({', '.join(FILES.values())}) there, or remove data.root to use the installed or "
                "downloaded copy"
            )
    else:
        directory = find_files()
    if directory is None and allow_download:
        try:
            directory = download(cache_dir())
        except OSError as exc:  # URLError is an OSError
            raise DataNotFoundError(_missing_message(root, f"the download failed ({exc})")) from None
    if directory is None:
        raise DataNotFoundError(_missing_message(root, "downloads are disabled (data.download=false)"))
    official = _official(directory)
    arrays = {k: read_idx(directory / f, SHA256[f] if official else None) for k, f in FILES.items()}
    for split in ("train", "test"):
        _check_split(directory, split, arrays[f"{split}_images"], arrays[f"{split}_labels"])
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
