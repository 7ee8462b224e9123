"""Typed records of one sweep over Hugging Face families and their JSON form."""

from __future__ import annotations

import dataclasses

from benchmarks.common import JsonRecord, Machine

PRUNED, NOTHING, SKIPPED, ERROR = "pruned", "nothing prunable", "skipped", "error"
"""A family's status: pruned (its columns say how well), no prunable layer found, not built or not run (the reason
is its ``error``), or the package failed on it (``error`` says where and what)."""

EXACT, CLOSE, DIFFERS, NOT_RUN = "exact", "close", "differs", ""
"""How two outputs compare: bit for bit, within float tolerance (:data:`~.check.RTOL`), not at all; not compared."""


@dataclasses.dataclass
class Comparison:
    """Two models' outputs on the same batch (or their generated tokens)."""

    outcome: str = NOT_RUN
    """:data:`EXACT`, :data:`CLOSE`, :data:`DIFFERS` or :data:`NOT_RUN`; ``error`` says why when it did not run."""
    max_abs_error: float = 0.0
    error: str = ""

    @property
    def equal(self) -> bool:
        """Exact or within float tolerance."""
        return self.outcome in (EXACT, CLOSE)


@dataclasses.dataclass
class HeadInfo:
    """The attention of a family as built: query and key/value heads of its first attention module, the unit."""

    attention_modules: int = 0
    """Modules whose head counts the package reads (:func:`lightning_actprune._heads.head_counts`)."""
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    unit: str = ""
    """What one neuron of a ``:heads`` layer is: ``query head`` (kept equally per key/value group under GQA) or
    ``key/value group``."""

    @property
    def grouped(self) -> bool:
        """Grouped-query (or multi-query) attention: fewer key/value heads than query heads."""
        return 0 < self.kv_heads < self.heads


@dataclasses.dataclass
class FamilyResult(JsonRecord):
    """One family through find → plan → prune → oracle → ``save_pretrained``/``from_pretrained`` → ``generate``.

    Seconds are CPU seconds of the family's own process (``time.process_time``, one thread).
    """

    name: str
    model_type: str
    model_class: str
    task: str
    curated: bool
    status: str = ERROR
    stage: str = "build"
    """The step that failed (``error``), or the last step run."""
    error: str = ""
    params: int = 0
    prunable_fraction: float = 0.0
    """The most a plan can remove: every prunable neuron but ``min_neurons`` per layer, over all parameters."""
    target: float = 0.0
    """The reduction asked for: 0.3, or half the prunable fraction when 0.3 is out of reach."""
    reduction: float = 0.0
    ffn_layers: int = 0
    ffn_pruned: int = 0
    head_layers: int = 0
    heads_pruned: int = 0
    attention: HeadInfo = dataclasses.field(default_factory=HeadInfo)
    oracle: Comparison = dataclasses.field(default_factory=Comparison)
    """The pruned model against the unpruned one with the removed neurons zeroed at their consumers."""
    padded: bool = False
    """``lightning_actprune.save_pretrained`` wrote zero padding (the config cannot state every width)."""
    stock_load: Comparison = dataclasses.field(default_factory=Comparison)
    """``lightning_actprune.save_pretrained`` → the stock ``AutoModel….from_pretrained``, against the pruned model."""
    ours_load: Comparison = dataclasses.field(default_factory=Comparison)
    """… → ``lightning_actprune.from_pretrained`` (padding removed, pruned size), against the pruned model."""
    uniform_reduction: float = 0.0
    uniform_unstated: list[str] = dataclasses.field(default_factory=list)
    """With ``uniform_widths=True``: what the synced config still cannot state (empty: everything)."""
    uniform_load: Comparison = dataclasses.field(default_factory=Comparison)
    """With ``uniform_widths=True``: the model's own ``save_pretrained`` → the stock loader, at the pruned size."""
    generate: Comparison = dataclasses.field(default_factory=Comparison)
    """Greedy tokens with the cache against without it, and against the zeroing oracle's (generating families)."""
    build_seconds: float = 0.0
    analysis_seconds: float = 0.0
    plan_seconds: float = 0.0
    total_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    messages: list[str] = dataclasses.field(default_factory=list)
    """What ``find_prunable_layers`` said it skipped, and why."""


@dataclasses.dataclass
class SweepResults(JsonRecord):
    """Every family of one run, the caps it ran under, and where it ran."""

    rows: list[FamilyResult]
    command: str
    machine: Machine
    transformers: str
    memory_gb: float
    cpu_seconds: float
    """The families' own CPU seconds, summed (each process's ``time.process_time``)."""
    total_seconds: float
    not_tried: list[str] = dataclasses.field(default_factory=list)
    """Families of the list that did not start: the run's wall-clock budget (``--budget-minutes``) was spent."""
