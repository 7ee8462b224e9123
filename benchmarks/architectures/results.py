"""Typed records of one architecture sweep and their JSON form."""

from __future__ import annotations

import dataclasses

from benchmarks.common import JsonRecord

EXACT, SKIPPED, ERROR = "pruned exactly", "skipped", "error"


@dataclasses.dataclass
class ModelResult:
    """One model through the callback's path, measured in its own process (times in CPU seconds, one thread)."""

    name: str
    status: str
    """:data:`EXACT`, :data:`SKIPPED` (nothing pruned, ``messages`` say why) or :data:`ERROR` (``error`` says what)."""
    params: int
    resolution: int = 0
    prunable_fraction: float = 0.0
    """Parameters of the modules that some prunable layer changes, over all parameters."""
    layers: int = 0
    reduction: float = 0.0
    analysis_seconds: float = 0.0
    search_seconds: float = 0.0
    validation_seconds: float = 0.0
    """One validation pass of 2,000 samples, extrapolated from the timed statistics pass on 16."""
    peak_rss_mb: float = 0.0
    max_abs_error: float = 0.0
    messages: list[str] = dataclasses.field(default_factory=list)
    error: str = ""
    layers_pruned: int = 0
    """Prunable layers that lose at least one neuron (or head) in the plan."""
    statistic: str = ""
    """The criterion the plan scored neurons by: the callback's default for a target."""

    @property
    def fixed_seconds(self) -> float:
        """Analysis (with its per-layer checks) and the λ search."""
        return self.analysis_seconds + self.search_seconds

    @property
    def ratio(self) -> float:
        """The fixed cost in validation passes of 2,000 samples."""
        return self.fixed_seconds / self.validation_seconds if self.validation_seconds else 0.0


@dataclasses.dataclass
class SweepResults(JsonRecord):
    """Every model of one run, and where it ran; its JSON is the results file."""

    rows: list[ModelResult]
    command: str
    cpu: str
    threads: int
    torch: str
    torchvision: str
    torch_pruning: str
    total_seconds: float


def merge(runs: list[SweepResults]) -> SweepResults:
    """Several sweeps of the same checkout (subsets of the models run side by side) as one, rows by model name.

    The commands are joined with ``&`` (they ran side by side) and the time is the longest run's.

    Raises:
        ValueError: the runs had different library versions, or a model appears twice.
    """
    if len({(r.torch, r.torchvision, r.torch_pruning) for r in runs}) != 1:
        raise ValueError("the runs used different library versions: they cannot share one table")
    rows = sorted((row for run in runs for row in run.rows), key=lambda row: row.name)
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"a model was measured twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return dataclasses.replace(
        runs[0],
        rows=rows,
        command=" & ".join(dict.fromkeys(run.command for run in runs)),
        total_seconds=max(run.total_seconds for run in runs),
    )
