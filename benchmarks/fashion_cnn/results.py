"""Typed records of one CNN benchmark run and their JSON form (``benchmarks/.cache/fashion_cnn_results.json``)."""

from __future__ import annotations

import dataclasses

from benchmarks.common import FlatJsonRecord, Machine, short_hash

OURS, OURS_RECALIBRATED = "ours one-shot", "ours + BN recalibration"
TP, TP_RECALIBRATED = "Torch-Pruning L2 one-shot", "Torch-Pruning L2 + BN recalibration"
OURS_RECOVERED = "ours + 1 recovery epoch"
TP_FINE_TUNED = "Torch-Pruning L2 + 1 epoch fine-tuning"
SCRATCH = "from scratch (ours' widths)"
SCRATCH_LONGER = "from scratch (ours' widths), 1 more epoch"
METHODS = (OURS, OURS_RECALIBRATED, OURS_RECOVERED, TP, TP_RECALIBRATED, TP_FINE_TUNED, SCRATCH, SCRATCH_LONGER)
"""The methods' names in :attr:`CNNRow.method`, in the report's order."""


@dataclasses.dataclass(frozen=True)
class CNNTrainConfig:
    """What the cached weights depend on."""

    widths: tuple[int, ...] = (8, 16, 32)
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 2
    seed: int = 0
    num_val: int = 10_000

    def key(self) -> str:
        """A short hash of the configuration, for the cache file name."""
        return short_hash(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class CNNSettings:
    """What the benchmark measures; the defaults are the published run."""

    targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    statistic: str = "fluctuation"
    normalize: bool = True
    recalibration_batches: int = 20
    cost_repeats: int = 3
    recovery_targets: tuple[float, ...] = (0.3, 0.5, 0.7)
    """The targets that also get the rows that train one more epoch (ours' recovery, Torch-Pruning's fine-tuning,
    from scratch with one more epoch): each costs a whole training run of ours."""


@dataclasses.dataclass
class CNNTrainingFacts:
    """How a network was trained, and whether this run loaded it from the cache."""

    train_seconds: float
    threads: int
    config: CNNTrainConfig
    final_val_acc: float | None = None
    cached: bool = False


@dataclasses.dataclass
class CNNRow:
    """One method at one target reduction.

    ``threshold`` is our λ and ``pruning_ratio`` Torch-Pruning's (``None`` for the other methods); ``channels`` are
    the channels each prunable group kept (or was built with, from scratch); ``recalibration_seconds`` and
    ``train_seconds`` are set on the rows that recalibrated or trained.
    """

    target: float
    method: str
    params: int
    reduction: float
    test_acc: float
    channels: dict[str, int]
    threshold: float | None = None
    pruning_ratio: float | None = None
    recalibration_seconds: float | None = None
    train_seconds: float | None = None


@dataclasses.dataclass
class RecalibrationCost:
    """Seconds of one BatchNorm recalibration (median of the repeats) against one validation pass."""

    batches: int
    seconds: float
    validation_seconds: float

    @property
    def ratio(self) -> float:
        """Recalibration time / one validation pass over the validation split."""
        return self.seconds / self.validation_seconds


@dataclasses.dataclass
class RecoveryFacts:
    """One ``fit`` with ``ActivationPruning(target_params_reduction=target, recovery_epochs=1)``.

    ``val_acc_base`` is the unpruned network's validation accuracy after its own training: the first epochs of this
    ``fit`` are the same recipe and seed, so ``val_acc_before_prune`` equals it when training is deterministic.
    ``epoch_seconds`` are the seconds spent in training steps (forward, backward, optimizer) in each epoch, the
    last one on the pruned model.
    """

    target: float
    pruned_at_epoch: int
    val_acc_base: float | None
    val_acc_before_prune: float
    val_acc_after_prune: float
    val_acc_recovered: float
    epoch_seconds: list[float]

    @property
    def epoch_ratio(self) -> float:
        """The recovery epoch's training time / the mean of the epochs before the prune."""
        return self.epoch_seconds[-1] / (sum(self.epoch_seconds[:-1]) / len(self.epoch_seconds[:-1]))


@dataclasses.dataclass
class CNNMeasurements:
    """Every number of one run."""

    settings: CNNSettings
    params_before: int
    test_acc_before: float
    groups: dict[str, int]
    batchnorm_layers: int
    rows: list[CNNRow]
    recalibration: RecalibrationCost
    benchmark_seconds: float
    recovery: list[RecoveryFacts] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class CNNRunInfo:
    """Where and how the run happened."""

    machine: Machine
    training: CNNTrainingFacts
    command: str
    total_seconds: float


@dataclasses.dataclass
class CNNBenchmarkResults(FlatJsonRecord):
    """One run: the measurements and the run they come from; what the report renders.

    Its JSON (the results cache) is one flat object: the fields of :class:`CNNMeasurements`, then those of
    :class:`CNNRunInfo`.
    """

    measurements: CNNMeasurements
    run: CNNRunInfo
