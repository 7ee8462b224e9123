"""Typed records of one benchmark run and their JSON form (``benchmarks/.cache/fashion_mnist_results.json``).

The JSON is one flat object: the fields of :class:`Measurements` followed by those of :class:`RunInfo`
(:class:`~benchmarks.common.FlatJsonRecord`). :meth:`BenchmarkResults.from_json` rebuilds the records from it, so
``--report-only`` renders the same report as the run that wrote it. The MLP's recipe is
:class:`benchmarks.common.TrainConfig` and the machine :class:`benchmarks.common.Machine`.
"""

from __future__ import annotations

import dataclasses

from benchmarks.common import FlatJsonRecord, Machine, TrainConfig
from lightning_actprune.core import STATISTICS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark measures; the defaults are the published run."""

    thresholds: tuple[float, ...] = (0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
    seed_statistic: str = "mean"
    marked_reduction: float = 0.70
    targets: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    plot_targets: tuple[float, ...] = (0.3, 0.6, 0.95)
    statistics: tuple[str, ...] = STATISTICS
    compensated_statistics: tuple[str, ...] = ("mean",)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    latency_rounds: int = 20
    latency_iterations: dict[int, int] = dataclasses.field(default_factory=lambda: {1: 50, 256: 3})
    speed_rounds: int = 40
    cost_repeats: int = 7
    noise_z: float = 1.96


@dataclasses.dataclass
class TrainingFacts:
    """How the model was trained, and whether this run loaded it from the cache."""

    train_seconds: float
    threads: int
    config: TrainConfig
    final_val_acc: float | None = None
    cached: bool = False


@dataclasses.dataclass
class Baseline:
    """The unpruned model."""

    params: int
    file_bytes: int
    size_mb: float
    test_acc: float
    val: dict[str, float]
    latency_ms_by_target: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    """Per target of table 2, the unpruned model's latency in ms per batch size (measured beside that target's)."""


@dataclasses.dataclass
class SweepRow:
    """One λ of the sweep (table 1)."""

    threshold: float
    widths: dict[str, int]
    params: int
    reduction: float
    file_bytes: int
    test_acc: float


@dataclasses.dataclass
class MethodRow:
    """One pruned model at one target reduction (table 2)."""

    target: float
    method: str
    family: str
    params: int
    nonzero: int
    file_bytes: int
    test_acc: float
    test_acc_std: float | None = None
    threshold: float | None = None
    widths: dict[str, int] | None = None
    latency_ms: dict[str, float] | None = None


@dataclasses.dataclass
class GridRow:
    """One setting of our options at one target reduction (table 3)."""

    target: float
    statistic: str
    compensate: bool
    normalize: bool
    threshold: float
    params: int
    widths: dict[str, int]
    test_acc: float


@dataclasses.dataclass
class TargetGap:
    """How far a setting is below the best setting of one target, with the paired standard error."""

    gap: float
    se: float
    best: str


@dataclasses.dataclass
class VariantSummary:
    """One setting of our options over all targets, compared with the best and with the seed's setting."""

    statistic: str
    compensate: bool
    normalize: bool
    label: str
    test_acc: dict[str, float]
    mean_test_acc: float
    below_best: float
    below_best_se: float
    within_noise: bool
    over_seed: float
    over_seed_se: float
    distance: int
    below_target_best: dict[str, TargetGap]


@dataclasses.dataclass
class Choice:
    """Table 3's summary: every setting, the best one and the one the rule recommends."""

    variants: list[VariantSummary]
    best: str
    recommended: str
    seed: str
    z: float
    test_examples: int
    rule: str

    def variant(self, label: str) -> VariantSummary:
        """The summary of the setting called ``label``."""
        return next(v for v in self.variants if v.label == label)


@dataclasses.dataclass
class SpeedRow:
    """One model's latency and throughput at one batch size, against the unpruned model's (table 5)."""

    model: str
    batch: int
    params: int
    latency_ms: float
    latency_ratio: float
    throughput_per_s: float
    throughput_ratio: float
    param_ratio: float


@dataclasses.dataclass
class PeakMemory:
    """The most memory held through PyTorch's allocator over one validation batch, without and with the recorder."""

    batch: int
    plain: int
    statistics: int


@dataclasses.dataclass
class Cost:
    """Seconds of the callback and of the statistics pass against plain validation passes (table 4)."""

    repeats: int
    seconds: dict[str, list[float]]
    median_seconds: dict[str, float]
    on_fit_end_ratio: float
    statistics_ratio: float
    statistics_ratio_per_round: list[float]
    peak_allocated_bytes: PeakMemory
    params_before: int
    plain_functions_params_after: int
    callback_params_after: int | None
    threshold: float
    metric_state_bytes: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Measurements:
    """Everything :func:`~benchmarks.fashion_mnist.run.run_benchmark` measures on one trained model."""

    settings: Settings
    baseline: Baseline
    layers: dict[str, int]
    never_active: dict[str, int]
    seed_table: list[SweepRow]
    marked: SweepRow | None
    comparison: list[MethodRow]
    grid: list[GridRow]
    choice: Choice
    table_mismatches: list[str]
    speed: list[SpeedRow]
    cost: Cost
    test_evaluations: int
    benchmark_seconds: float


@dataclasses.dataclass
class RunInfo:
    """Where and how the measurements were taken."""

    machine: Machine
    training: TrainingFacts
    command: str
    total_seconds: float


@dataclasses.dataclass
class BenchmarkResults(FlatJsonRecord):
    """One run: the measurements and the run they come from; what the report renders.

    Its JSON (the results cache) is one flat object: the fields of :class:`Measurements`, then those of
    :class:`RunInfo`.
    """

    measurements: Measurements
    run: RunInfo
