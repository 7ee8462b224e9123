"""Typed records of one recovery benchmark run and their JSON form (``benchmarks/.cache/recovery_results.json``)."""

from __future__ import annotations

import dataclasses

from benchmarks.common import JsonRecord, Machine, TrainConfig, short_hash


@dataclasses.dataclass(frozen=True)
class RecoveryConfig:
    """What the run measures; the defaults are the published run."""

    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reductions: tuple[float, ...] = (0.8, 0.9, 0.95)
    recovery_epochs: tuple[int, ...] = (1, 2)
    taylor_batches: int = 8
    """Training batches whose gradients Torch-Pruning's Taylor importance reads."""
    bisection_steps: int = 24
    """Halvings of Torch-Pruning's ``pruning_ratio`` interval when matching a reduction."""

    def __post_init__(self) -> None:
        if self.train.epochs < 2:
            raise ValueError(
                f"`epochs` must be at least 2 (the base is resumed after epochs - 1); got {self.train.epochs}."
            )
        for reduction in self.reductions:
            if not 0 < reduction < 1:
                raise ValueError(f"every reduction must be in (0, 1); got {reduction!r}.")
        if not self.recovery_epochs or min(self.recovery_epochs) < 1:
            raise ValueError(f"`recovery_epochs` must be positive integers; got {self.recovery_epochs!r}.")

    def base_key(self) -> str:
        """A short hash of what the base checkpoint depends on, for its file name."""
        return short_hash({**dataclasses.asdict(self.train), "shuffle": "epoch-seeded"})


@dataclasses.dataclass
class Row:
    """One model: a method at one reduction after ``recovery_epochs`` epochs of training the smaller model."""

    reduction: float
    method: str
    recovery_epochs: int
    params: int
    test_acc: float
    widths: list[int]


@dataclasses.dataclass
class EpochTime:
    """Training seconds of the unpruned epoch and of the recovery epochs of one fit with recovery."""

    reduction: float
    recovery_epochs: int
    unpruned_seconds: float
    recovery_seconds: list[float]
    test_acc_after_prune: float
    """Test accuracy right after the in-``fit`` prune, before any recovery epoch (the callback's one-shot)."""

    @property
    def ratio(self) -> float:
        """Mean recovery epoch time over the unpruned epoch's."""
        return sum(self.recovery_seconds) / len(self.recovery_seconds) / self.unpruned_seconds


@dataclasses.dataclass
class Base:
    """The unpruned model after ``E`` epochs."""

    params: int
    test_acc: float
    epoch_seconds: float
    train_seconds: float
    cached: bool


@dataclasses.dataclass
class RecoveryResults(JsonRecord):
    """Everything one run measured, and where; its JSON is the results cache."""

    config: RecoveryConfig
    base: Base
    rows: list[Row]
    times: list[EpochTime]
    machine: Machine
    command: str
    total_seconds: float
