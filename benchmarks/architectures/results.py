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
