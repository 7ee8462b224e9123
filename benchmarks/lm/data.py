"""The corpus: the Python standard library's own source files as bytes, split by file, cut into fixed-length chunks.

Every machine that runs Python has these files, so the benchmark needs no download. A file's split comes from a
hash of its path relative to the standard library's root (the same split on every machine with the same files:
in hash order, files go to test until it holds ``test_bytes``, then to validation, the rest to training);
each file becomes ``BOS, its bytes, EOS``, the files of a split are concatenated in path order and cut into
non-overlapping chunks of ``context + 1`` tokens (inputs and next-token targets); the last chunk of a split is padded
and its padding is not scored, so validation and test perplexity count every byte of their files exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

BOS, EOS, PAD = 256, 257, 258
"""Start and end of a file, and the padding of a split's last chunk (never a target)."""
VOCAB_SIZE = 259
IGNORE_INDEX = -100
"""The target of a padded position: ``F.cross_entropy`` skips it."""
SPLITS = ("train", "val", "test")
EXCLUDED_DIRECTORIES = (
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "__pycache__",
)
"""Directories whose files stay out of the corpus: installed packages, test suites (the library's tests, not the
library), and generated files: ``encodings`` (codec tables written by a script) and ``pydoc_data`` (one 750 kB
string of help text)."""


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Which files, how they are split and cut; the defaults are the published run."""

    test_bytes: int = 150_000
    val_bytes: int = 100_000
    context: int = 128
    max_files: int | None = None
    """Keep only the first ``max_files`` files in path order (a quick run); ``None``: every file."""
    root: str | None = None
    """The directory searched for ``*.py``; ``None``: ``sysconfig.get_paths()["stdlib"]``."""

    def __post_init__(self) -> None:
        for name in ("test_bytes", "val_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive number of bytes; got {getattr(self, name)!r}.")
        if self.context < 8:
            raise ValueError(f"`context` must be at least 8 bytes; got {self.context!r}.")
        if self.max_files is not None and self.max_files < 3:
            raise ValueError(f"`max_files` must be at least 3 (one file per split) or None; got {self.max_files!r}.")


@dataclasses.dataclass
class SourceFile:
    """One file of the corpus: its path relative to the root, its size in bytes and its split."""

    path: str
    size: int
    split: str


def stdlib_root() -> Path:
    """The standard library's directory of this interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def hash_position(relative_path: str) -> float:
    """Where a file falls in ``[0, 1)``: the first 8 bytes of its path's SHA-256 as a fraction of 2⁶⁴."""
    return int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2**64


def assign_splits(files: Sequence[SourceFile], test_bytes: int, val_bytes: int) -> None:
    """Set each file's split, in the order of :func:`hash_position`.

    Files go to test until it holds ``test_bytes``, then to validation until it holds ``val_bytes``, the rest to
    training (which keeps at least the last file).
    """
    order = sorted(files, key=lambda f: (hash_position(f.path), f.path))
    totals = {"test": 0, "val": 0}
    for index, file in enumerate(order):
        last = index == len(order) - 1
        if totals["test"] < test_bytes and not last:
            file.split = "test"
        elif totals["val"] < val_bytes and not last:
            file.split = "val"
        else:
            file.split = "train"
        if file.split in totals:
            totals[file.split] += file.size


def list_files(config: CorpusConfig) -> tuple[Path, list[SourceFile]]:
    """The root and every non-empty ``*.py`` outside :data:`EXCLUDED_DIRECTORIES`, in path order, with its split.

    With ``max_files``, only the first files in path order are kept.
    """
    root = Path(config.root) if config.root is not None else stdlib_root()
    paths = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if path.is_file()
        and path.stat().st_size > 0
        and not set(path.relative_to(root).parts[:-1]) & set(EXCLUDED_DIRECTORIES)
    )
    if config.max_files is not None:
        paths = paths[: config.max_files]
    if len(paths) < 3:
        raise ValueError(f"the corpus needs at least 3 Python files; {root} has {len(paths)} outside tests.")
    files = [SourceFile(path, (root / path).stat().st_size, "train") for path in paths]
    assign_splits(files, config.test_bytes, config.val_bytes)
    return root, files


def encode(root: Path, files: Sequence[SourceFile]) -> Tensor:
    """``BOS, bytes, EOS`` of each file, concatenated in the order given (int64 tokens)."""
    pieces = []
    for file in files:
        data = torch.frombuffer(bytearray((root / file.path).read_bytes()), dtype=torch.uint8).long()
        pieces += [torch.tensor([BOS]), data, torch.tensor([EOS])]
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


class Chunks(Dataset[tuple[Tensor, Tensor]]):
    """Non-overlapping windows of ``context + 1`` tokens: inputs ``w[:-1]`` and targets ``w[1:]``.

    The last window is padded with :data:`PAD`; its padded targets are :data:`IGNORE_INDEX`. Every token but the
    first is a target exactly once.
    """

    def __init__(self, tokens: Tensor, context: int) -> None:
        self.context = context
        windows = max(1, -(-(len(tokens) - 1) // context))
        padded = torch.full((windows * context + 1,), PAD, dtype=torch.long)
        padded[: len(tokens)] = tokens
        self.inputs = padded[:-1].view(windows, context)
        self.targets = padded[1:].view(windows, context).clone()
        self.targets[self.targets == PAD] = IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]

    @property
    def scored_tokens(self) -> int:
        """Targets that count (not padding)."""
        return int((self.targets != IGNORE_INDEX).sum())


class EpochShuffle(Sampler[int]):
    """A permutation per epoch, seeded by ``(seed, epoch)``: a resumed fit sees the order an uninterrupted one does.

    Lightning calls :meth:`set_epoch` before every training epoch, with the epoch's index (restored on resume).
    """

    def __init__(self, size: int, seed: int, epoch_offset: int = 0) -> None:
        self.size, self.seed, self.epoch_offset, self.epoch = size, seed, epoch_offset, epoch_offset

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of epoch ``epoch + epoch_offset``."""
        self.epoch = epoch + self.epoch_offset

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@dataclasses.dataclass
class Corpus:
    """The three splits as chunk datasets, and the files they come from."""

    root: str
    files: list[SourceFile]
    train: Chunks
    val: Chunks
    test: Chunks

    @classmethod
    def load(cls, config: CorpusConfig) -> Corpus:
        """List, split, read and cut the files."""
        root, files = list_files(config)
        chunks = {
            split: Chunks(encode(root, [f for f in files if f.split == split]), config.context) for split in SPLITS
        }
        return cls(str(root), files, chunks["train"], chunks["val"], chunks["test"])

    def bytes_in(self, split: str) -> int:
        """Bytes of the files of ``split``."""
        return sum(f.size for f in self.files if f.split == split)


class CorpusDataModule(pl.LightningDataModule):
    """Training chunks in an epoch-seeded order (:class:`EpochShuffle`); validation and test chunks in order.

    ``epoch_offset``: a fit's first epoch gets the order of that epoch of a fit from the start (fine-tuning a pruned
    model on the very batches the recovery epochs of a resumed fit see).
    """

    def __init__(self, corpus: Corpus, batch_size: int, eval_batch_size: int, seed: int, epoch_offset: int = 0) -> None:
        super().__init__()
        self.corpus, self.batch_size, self.eval_batch_size, self.seed = corpus, batch_size, eval_batch_size, seed
        self.epoch_offset = epoch_offset

    def shifted(self, epoch_offset: int) -> CorpusDataModule:
        """The same data whose first epoch is epoch ``epoch_offset``'s order."""
        return CorpusDataModule(self.corpus, self.batch_size, self.eval_batch_size, self.seed, epoch_offset)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.corpus.train), self.seed, self.epoch_offset)
        return DataLoader(self.corpus.train, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.corpus.val, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.corpus.test, batch_size=self.eval_batch_size)
