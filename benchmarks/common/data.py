"""Fashion-MNIST (the Debian package ``dataset-fashion-mnist``) and the data module the benchmarks train on.

The package puts the four standard IDX files under ``/usr/share/datasets/fashion-mnist``. Nothing is installed
unless the caller asks (``install=True``, the command line's ``--install-data``); otherwise a missing dataset stops
the run with a message naming the command that installs it.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
INSTALL_COMMAND = f"apt-get update && apt-get install -y {DEBIAN_PACKAGE}"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_HOW_TO_GET_IT = (
    f"Install it with `{INSTALL_COMMAND}` (files under {DATA_DIR}), or rerun with `--install-data` to let the"
    f" benchmark run that command, or pass `--data-dir` / set FASHION_MNIST_DIR to a directory with"
    f" {', '.join(IDX_FILES.values())}."
)


def read_idx(path: Path) -> Tensor:
    """Read one gzipped IDX file of unsigned bytes (the MNIST format) into a ``uint8`` tensor."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), body has {len(body)}.")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _has_idx_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in IDX_FILES.values())


def locate_fashion_mnist(data_dir: Path | None = None, install: bool = False, package_dir: Path = DATA_DIR) -> Path:
    """The directory holding Fashion-MNIST's four IDX files; installs the Debian package only if ``install``.

    Args:
        data_dir: look only here (never installs); default: ``$FASHION_MNIST_DIR``, then ``package_dir``.
        install: when the files are missing, run ``apt-get update && apt-get install -y dataset-fashion-mnist`` (as
            root or via ``sudo -n``). Off by default: nothing is installed unless asked.
        package_dir: where the Debian package puts the files.

    Raises:
        FileNotFoundError: the files are not there (and were not installed); the message names the install command.
    """
    if data_dir is not None:
        if _has_idx_files(data_dir):
            return data_dir
        raise FileNotFoundError(f"{data_dir} does not hold Fashion-MNIST's IDX files. {_HOW_TO_GET_IT}")
    candidates = [Path(os.environ["FASHION_MNIST_DIR"])] if os.environ.get("FASHION_MNIST_DIR") else []
    candidates.append(package_dir)
    for directory in candidates:
        if _has_idx_files(directory):
            return directory
    if not install:
        looked = ", ".join(map(str, candidates))
        raise FileNotFoundError(f"Fashion-MNIST is not installed (looked in {looked}). {_HOW_TO_GET_IT}")
    why = install_fashion_mnist()
    if _has_idx_files(package_dir):
        return package_dir
    why = why or f"apt-get ran, but {package_dir} still lacks the files"
    raise FileNotFoundError(f"Fashion-MNIST could not be installed ({why}). {_HOW_TO_GET_IT}")


def install_fashion_mnist() -> str:
    """Run ``apt-get update && apt-get install -y dataset-fashion-mnist``, as root or through ``sudo -n``.

    Returns:
        Why it failed, or an empty string if ``apt-get`` succeeded.
    """
    if not shutil.which("apt-get"):
        return "apt-get is not available"
    if os.geteuid() == 0:
        prefix = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        return "not root and no sudo"
    print(f"Fashion-MNIST not found; installing the Debian package {DEBIAN_PACKAGE} ...", file=sys.stderr)
    update = subprocess.run([*prefix, "apt-get", "update"], capture_output=True, text=True)
    done = subprocess.run([*prefix, "apt-get", "install", "-y", DEBIAN_PACKAGE], capture_output=True, text=True)
    if done.returncode == 0:
        return ""
    return f"apt-get failed: {(done.stderr or update.stderr).strip()[-300:]}"


def load_fashion_mnist(directory: Path, num_val: int = 10_000) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train, validation (the last ``num_val`` training images) and test sets; pixels flattened, scaled to [0, 1]."""
    tensors = {key: read_idx(directory / name) for key, name in IDX_FILES.items()}
    x_train = tensors["train_images"].flatten(1).float() / 255.0
    x_test = tensors["test_images"].flatten(1).float() / 255.0
    y_train, y_test = tensors["train_labels"].long(), tensors["test_labels"].long()
    cut = len(x_train) - num_val
    return (
        TensorDataset(x_train[:cut], y_train[:cut]),
        TensorDataset(x_train[cut:], y_train[cut:]),
        TensorDataset(x_test, y_test),
    )


class SplitDataModule(pl.LightningDataModule):
    """Fixed train/validation/test tensors; the training order is shuffled with a seeded generator."""

    def __init__(
        self,
        train: TensorDataset,
        val: TensorDataset,
        test: TensorDataset,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)
