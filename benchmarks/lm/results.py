"""Typed records of one language-model benchmark run and their JSON form (``--out``)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from benchmarks.common import JsonRecord, Machine, short_hash

from .data import CorpusConfig, SourceFile
from .model import LayerWidths, ModelConfig

UNPRUNED = "unpruned"
UNPRUNED_LONGER = "unpruned, trained on"
OURS = "ours, one-shot"
OURS_RECOVERED = "ours + recovery"
SCRATCH = "from scratch, ours' widths"
GQA_UNITS = ("query_heads", "kv_groups")
"""The units of grouped-query attention the package offers (``ActivationPruning(gqa_unit=...)``)."""


def default_gqa_unit() -> str:
    """The package's default ``gqa_unit``: what the ``ours`` rows use (they pass no ``gqa_unit``)."""
    from lightning_actprune._config import PruningSettings

    return str(PruningSettings.__dataclass_fields__["gqa_unit"].default)


def other_gqa_unit() -> str:
    """The unit that is not the default: the rows that compare the two units use it."""
    return next(unit for unit in GQA_UNITS if unit != default_gqa_unit())


def ours_with_unit(method: str, gqa_unit: str) -> str:
    """The label of an ``ours`` row with another ``gqa_unit`` than the default."""
    return f"{method}, `gqa_unit: {gqa_unit}`"


TP_SCOPE_LABELS = {"recipe": "", "ffn": ", FFN only", "hidden": ", hidden size too"}


def tp_method(importance: str, scope: str = "recipe") -> str:
    """The row label of one Torch-Pruning setting (``scope``: see :data:`~.methods.TP_SCOPES`)."""
    return f"Torch-Pruning {importance}{TP_SCOPE_LABELS[scope]}"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the run measures; the defaults are the published run."""

    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    epochs: int = 8
    """``E``: epochs before pruning."""
    steps_per_epoch: int = 80
    """``S``: training batches per epoch (``limit_train_batches``)."""
    recovery_epochs: int = 1
    """``R``: epochs of training after the prune (ours' recovery, Torch-Pruning's fine-tuning)."""
    batch_size: int = 16
    eval_batch_size: int = 32
    reductions: tuple[float, ...] = (0.3, 0.5)
    seeds: tuple[int, ...] = (0,)
    taylor_batches: int = 4
    """Training batches whose gradients Torch-Pruning's Taylor importance reads."""
    bisection_steps: int = 14
    """Halvings of Torch-Pruning's ``pruning_ratio`` interval when matching ours' parameter count."""
    scratch: bool = False
    tp_scopes: tuple[str, ...] = ("recipe", "ffn")
    """What Torch-Pruning may prune, one setting each (``hidden``: the recipe as its script runs it)."""
    tp_reductions: tuple[float, ...] | None = None
    """The reductions Torch-Pruning's rows are run at (``None``: every reduction); a smaller scope to save time."""
    compare_gqa_unit: bool = True
    """Also ours + recovery with the other ``gqa_unit`` (its one-shot row is the test loss right after its prune)."""
    step_fractions: tuple[float, ...] = (1.0, 0.25)
    """Ours + recovery by steps: ``recovery_steps = N`` of ``fraction × S`` (at least 1); empty: none."""
    distill_weights: tuple[float, ...] = (0.0, 0.5)
    """Each step recovery with each ``distill_weight`` (``0``: no distillation)."""
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.epochs < 2:
            raise ValueError(f"`epochs` must be at least 2 (the base is resumed after epochs - 1); got {self.epochs}.")
        for name in ("steps_per_epoch", "recovery_epochs", "batch_size", "eval_batch_size", "taylor_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {getattr(self, name)!r}.")
        if not self.reductions or not all(0 < r < 1 for r in self.reductions):
            raise ValueError(f"every reduction must be in (0, 1); got {self.reductions!r}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct integers, at least one; got {self.seeds!r}.")
        if self.tp_reductions is not None and set(self.tp_reductions) - set(self.reductions):
            raise ValueError(
                f"`tp_reductions` must be among the reductions {self.reductions!r}; got {self.tp_reductions!r}."
            )
        if not self.tp_scopes or set(self.tp_scopes) - set(TP_SCOPE_LABELS):
            raise ValueError(f"`tp_scopes` can hold {', '.join(TP_SCOPE_LABELS)}; got {self.tp_scopes!r}.")
        if not all(f > 0 for f in self.step_fractions) or len(set(self.step_fractions)) != len(self.step_fractions):
            raise ValueError(f"`step_fractions` must be distinct positive numbers; got {self.step_fractions!r}.")
        if self.step_fractions and (
            not self.distill_weights
            or not all(w >= 0 for w in self.distill_weights)
            or len(set(self.distill_weights)) != len(self.distill_weights)
        ):
            raise ValueError(
                f"`distill_weights` must be distinct numbers >= 0, one at least; got {self.distill_weights!r}."
            )
        if self.distill_temperature <= 0:
            raise ValueError(f"`distill_temperature` must be > 0; got {self.distill_temperature!r}.")
        if self.corpus.context != self.model.context:
            raise ValueError(
                f"the corpus's context ({self.corpus.context}) must be the model's ({self.model.context})."
            )

    def base_key(self, seed: int) -> str:
        """A short hash of what the base checkpoint of ``seed`` depends on, for its file name."""
        fields = {
            "corpus": dataclasses.asdict(self.corpus),
            "model": dataclasses.asdict(self.model),
            "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "batch_size": self.batch_size,
            "seed": seed,
        }
        return short_hash(fields)

    @property
    def recovery_step_counts(self) -> tuple[int, ...]:
        """``N`` of each step recovery: ``fraction × S`` rounded, at least 1."""
        return tuple(max(1, round(f * self.steps_per_epoch)) for f in self.step_fractions)


@dataclasses.dataclass
class Row:
    """One model: a method at one reduction (0 for the unpruned rows), after ``epochs_after_prune`` epochs."""

    seed: int
    reduction: float
    method: str
    epochs_after_prune: int
    params: int
    test_loss: float
    widths: list[LayerWidths]
    prune_seconds: float | None = None
    """The prune itself: the callback's hook, or one Torch-Pruning prune at the ratio found."""
    search_seconds: float | None = None
    """Torch-Pruning only: the bisection of its ratio (every trial prune), Taylor's gradients included."""
    train_epoch_seconds: list[float] = dataclasses.field(default_factory=list)
    """Seconds of each training epoch after the prune (training batches only)."""
    ratio: float | None = None
    """Torch-Pruning's ``pruning_ratio`` (= ``head_pruning_ratio``)."""

    @property
    def test_ppl(self) -> float:
        """Test perplexity per byte."""
        return math.exp(self.test_loss) if self.test_loss < 700 else math.inf


@dataclasses.dataclass
class PlanLayer:
    """One layer of ours' plan: its name in the model, what its units are, how many it had and kept."""

    name: str
    kind: str
    """``"heads"`` (``<attention>:heads``), ``"ffn"`` (an MLP's neurons) or ``"other"``."""
    decoder_layer: int | None
    neurons: int
    kept: int

    @classmethod
    def of(cls, name: str, neurons: int, kept: int) -> PlanLayer:
        """Classify a plan layer by its name."""
        kind = "heads" if name.endswith(":heads") else "ffn" if ".mlp." in name else "other"
        match = re.search(r"layers\.(\d+)\.", name)
        return cls(name, kind, int(match.group(1)) if match else None, neurons, kept)


@dataclasses.dataclass
class OursPlan:
    """What the callback did at one reduction: its plan's layers, its λ, and what it said."""

    seed: int
    reduction: float
    threshold: float
    statistic: str
    layers: list[PlanLayer]
    prunable_layers: list[str]
    val_loss_before: float
    val_loss_after: float
    test_loss_right_after_prune_in_fit: float
    """With recovery: the test loss at the end of the prune epoch, after the prune (the same plan as one-shot's)."""
    messages: list[str]
    """The package's warnings during the fit (layers it skipped, and why)."""
    gqa_unit: str = "query_heads"
    """The unit of grouped-query attention this plan was made with."""


@dataclasses.dataclass
class StepRecovery:
    """Ours + recovery by steps at one reduction: the prune at step ``E·S`` of a ``max_steps = E·S + N`` fit."""

    seed: int
    reduction: float
    recovery_steps: int
    distill_weight: float
    distill_temperature: float
    params: int
    widths: list[LayerWidths]
    test_loss_after_prune: float
    test_loss: float
    """After the ``N`` recovery steps."""
    prune_seconds: float
    """The callback's ``on_train_batch_end`` at the prune step: its own validation pass and the prune."""
    step_seconds: list[float]
    """Each recovery step: forward, backward and optimizer step (with the teacher's forward when distilling)."""

    @property
    def test_ppl_after_prune(self) -> float:
        """Test perplexity per byte right after the prune."""
        return math.exp(self.test_loss_after_prune) if self.test_loss_after_prune < 700 else math.inf

    @property
    def test_ppl(self) -> float:
        """Test perplexity per byte after recovery."""
        return math.exp(self.test_loss) if self.test_loss < 700 else math.inf


@dataclasses.dataclass
class SeedRun:
    """Everything one seed measured."""

    seed: int
    base_seconds: float
    base_cached: bool
    unpruned_val_loss: float
    validation_seconds: list[float]
    """Seconds of one ``trainer.validate`` pass over the validation split, measured at the start and at the end."""
    test_seconds: float
    """Seconds of one plain no-grad pass over the test split."""
    train_epoch_seconds: float
    """Seconds of one unpruned training epoch (``S`` steps)."""
    analysis_seconds: float
    """Seconds of ``find_prunable_layers`` on the unpruned model: the analysis the callback runs at the start of fit."""
    rows: list[Row]
    plans: list[OursPlan]
    step_recoveries: list[StepRecovery] = dataclasses.field(default_factory=list)

    @classmethod
    def join(cls, first: SeedRun, later: SeedRun) -> SeedRun:
        """One seed measured in two runs (a later run adding rows the first lacks, from the same trained base).

        The unpruned rows, timings and base are the first run's; every other row, plan and step recovery is taken
        from the run that has it. Raises ``ValueError`` if both runs hold the same row.
        """
        if first.seed != later.seed:
            raise ValueError(f"cannot join the runs of seeds {first.seed} and {later.seed}.")

        def key(row: Row) -> tuple[float, str, int]:
            return row.reduction, row.method, row.epochs_after_prune

        def step_key(record: StepRecovery) -> tuple[float, int, float]:
            return record.reduction, record.recovery_steps, record.distill_weight

        both = {key(r) for r in first.rows if r.reduction} & {key(r) for r in later.rows if r.reduction}
        both_steps = {step_key(r) for r in first.step_recoveries} & {step_key(r) for r in later.step_recoveries}
        if both or both_steps:
            raise ValueError(f"the runs repeat seed {first.seed}'s rows: {sorted(both) or sorted(both_steps)}.")
        return dataclasses.replace(
            first,
            rows=first.rows + [row for row in later.rows if row.reduction],
            plans=first.plans + later.plans,
            step_recoveries=first.step_recoveries + later.step_recoveries,
        )

    @property
    def validation_pass(self) -> float:
        """The timing unit: the mean of the validation passes."""
        return sum(self.validation_seconds) / len(self.validation_seconds)


@dataclasses.dataclass
class CorpusFacts:
    """The files and what each split holds."""

    root: str
    excluded_directories: list[str]
    files: list[SourceFile]
    bytes: dict[str, int]
    chunks: dict[str, int]
    scored_tokens: dict[str, int]


@dataclasses.dataclass
class ParameterCount:
    """The unpruned model's parameters by part (embeddings and LM head are in the total)."""

    total: int
    embedding: int
    lm_head: int
    attention: int
    ffn: int
    norms: int
    tied: bool


@dataclasses.dataclass
class LMResults(JsonRecord):
    """One run: its configuration, the corpus, every seed's measurements, and where and how it ran."""

    config: RunConfig
    corpus: CorpusFacts
    parameters: ParameterCount
    seeds: list[SeedRun]
    machine: Machine
    command: str
    total_seconds: float

    def rows(self) -> list[Row]:
        """Every row of every seed."""
        return [row for run in self.seeds for row in run.rows]

    @classmethod
    def merge(cls, parts: Sequence[LMResults]) -> LMResults:
        """The seeds of several runs of one protocol as one run (runs of one seed each, or a run resumed).

        The runs must agree on everything but their seeds, their reductions and the extra rows (``tp_reductions``,
        ``compare_gqa_unit``, ``step_fractions``, ``distill_weights``), so that a seed run later may leave rows out
        to finish in time: the merged configuration is the first run's with every seed and every reduction (in the
        order first met); the report says which seeds each row holds. Runs of one seed join into one seed
        (:meth:`SeedRun.join`): a later run may add a reduction the seed's first run left out.
        """
        if not parts:
            raise ValueError("`parts` must hold at least one run.")
        first = parts[0]
        extras = ("seeds", "reductions", "tp_reductions", "compare_gqa_unit", "step_fractions", "distill_weights")

        def protocol(results: LMResults) -> RunConfig:
            return dataclasses.replace(results.config, **{name: getattr(first.config, name) for name in extras})

        for part in parts[1:]:
            if protocol(part) != first.config or part.corpus != first.corpus or part.parameters != first.parameters:
                raise ValueError(
                    f"runs of different protocols cannot be merged: {part.command!r} and {first.command!r} differ in"
                    " more than their seeds and extra rows."
                )
        by_seed: dict[int, SeedRun] = {}
        for run in (run for part in parts for run in part.seeds):
            by_seed[run.seed] = SeedRun.join(by_seed[run.seed], run) if run.seed in by_seed else run
        seeds = list(by_seed.values())
        numbers = [run.seed for run in seeds]
        reductions = tuple(dict.fromkeys(r for part in parts for r in part.config.reductions))
        return cls(
            config=dataclasses.replace(first.config, seeds=tuple(numbers), reductions=reductions),
            corpus=first.corpus,
            parameters=first.parameters,
            seeds=seeds,
            machine=first.machine,
            command=" && ".join(part.command for part in parts),
            total_seconds=sum(part.total_seconds for part in parts),
        )
