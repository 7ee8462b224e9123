"""Typed records of one cost run and their JSON form."""

from __future__ import annotations

import dataclasses
import json

from benchmarks.common import from_plain

BUDGET_FRACTION, BUDGET_FLOOR_SECONDS = 0.10, 2.0
"""Issue 23's goal: everything but the validation passes costs at most 10 % of one pass, or 2 s if that is more."""

OVERHEAD_BUDGET = 0.10
"""Issue 23's goal for recording statistics: at most 10 % more than a plain validation batch."""


@dataclasses.dataclass
class Measurement:
    """One model with one version of the package, in a process of its own (wall-clock seconds)."""

    model: str
    version: str
    """``before`` (the baseline commit) or ``after`` (this checkout)."""
    resolution: int
    images: int
    batch_size: int
    package: str = ""
    """Where ``lightning_actprune`` was imported from: proof that each version ran its own code."""
    params: int = 0
    measured_layers: int = 0
    """The ``Linear``/``Conv`` layers whose inputs the recorder measures."""
    validation_seconds: float = 0.0
    """One plain validation pass: the mean of one before and one after the fit."""
    validation_spread: float = 0.0
    """How far apart those two passes were, as a fraction of their mean: the noise of the machine."""
    prune_seconds: float = 0.0
    """The analysis at the first validation batch of ``fit``, and the callback's ``prune``."""
    analysis_seconds: float = 0.0
    passes_seconds: float = 0.0
    """The validation passes inside ``prune`` (statistics, after the surgery, BatchNorm recalibration)."""
    passes: int = 0
    reduction: float = 0.0
    batch_seconds: float = 0.0
    """A plain validation batch, in inference mode (the fastest batch of :data:`~.measure.OVERHEAD_RUNS` runs)."""
    recorded_batch_seconds: float = 0.0
    """The same batch under ``ActivationRecorder(model)`` (every moment), after the recorder's first batch."""
    needed_batch_seconds: float = 0.0
    """Under ``ActivationRecorder(model, moments=recorded_moments(...))``: what the default reads (0: unsupported)."""
    recorder_setup_seconds: float = 0.0
    """What the callback's recorder's first batch costs beyond the others (its per-layer metrics): once per pass."""
    update_share: float = 0.0
    """Of a batch under the callback's recorder, the seconds inside its metric updates over the rest of the batch
    (the median over every timed batch after the first): its overhead measured within one batch (0: not measured)."""
    error: str = ""

    @property
    def other_seconds(self) -> float:
        """Everything in the prune step but its validation passes: analysis, checks, scoring, search, surgery."""
        return self.prune_seconds - self.passes_seconds

    @property
    def other_ratio(self) -> float:
        """:attr:`other_seconds` in plain validation passes."""
        return self.other_seconds / self.validation_seconds if self.validation_seconds else 0.0

    @property
    def budget_seconds(self) -> float:
        """What :attr:`other_seconds` may cost: 10 % of a pass or 2 s, whichever is larger."""
        return max(BUDGET_FRACTION * self.validation_seconds, BUDGET_FLOOR_SECONDS)

    @property
    def met(self) -> bool:
        """Whether the prune step met the goal."""
        return not self.error and self.other_seconds <= self.budget_seconds

    @property
    def statistics_overhead(self) -> float:
        """What recording every moment adds to a validation batch, as a fraction of it."""
        return self.recorded_batch_seconds / self.batch_seconds - 1 if self.batch_seconds else 0.0

    @property
    def callback_overhead(self) -> float:
        """What the callback's own recorder adds: only the default's moments where the version can, else every one."""
        needed = self.needed_overhead
        return self.statistics_overhead if needed is None else needed

    @property
    def needed_overhead(self) -> float | None:
        """What recording only the moments of the default statistic adds, or None when the version cannot."""
        if not self.batch_seconds or not self.needed_batch_seconds:
            return None
        return self.needed_batch_seconds / self.batch_seconds - 1


@dataclasses.dataclass
class CostResults:
    """Every measurement of one run, and where it ran."""

    rows: list[Measurement]
    command: str
    cpu: str
    threads: int
    torch: str
    torch_pruning: str
    baseline: str
    """The commit the ``before`` rows ran."""
    current: str
    """The commit (and whether the checkout had changes) the ``after`` rows ran."""
    total_seconds: float
    skipped_before: list[str] = dataclasses.field(default_factory=list)
    """Models whose baseline row was left out (``--skip-before``)."""

    def to_json(self) -> str:
        """The JSON object of the whole run."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> CostResults:
        """The records back from :meth:`to_json`'s text."""
        return from_plain(cls, json.loads(text))


def merge(runs: list[CostResults], order: list[str]) -> CostResults:
    """Several runs of the same checkout (e.g. groups of models run in parallel processes) as one.

    Rows go by model in ``order``, ``before`` first; the commands are joined with ``&`` (they ran side by side),
    the time is the longest run's.

    Raises:
        ValueError: the runs measured different commits, or a model and version twice.
    """
    if len({(r.baseline, r.current, r.threads) for r in runs}) != 1:
        raise ValueError("the runs measured different commits or thread counts: they cannot share one table")
    rows = sorted(
        (row for run in runs for row in run.rows),
        key=lambda row: (order.index(row.model) if row.model in order else len(order), row.version != "before"),
    )
    pairs = [(row.model, row.version) for row in rows]
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"a model and version measured twice: {pairs}")
    first = runs[0]
    return dataclasses.replace(
        first,
        rows=rows,
        command=" & ".join(dict.fromkeys(run.command for run in runs)),
        total_seconds=max(run.total_seconds for run in runs),
        skipped_before=sorted(
            {m for run in runs for m in run.skipped_before},
            key=lambda m: (order.index(m) if m in order else len(order), m),
        ),
    )
