"""Neuron scorers: the criterion λ is compared against, as an object a user can replace with their own."""

from __future__ import annotations

import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_actprune import _recurrent as recurrent
from lightning_actprune._conv1d import out_in_weight
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._statistics import (
    MOMENTS,
    SIGNED_STATISTICS,
    STATISTIC_MOMENTS,
    STATISTICS,
    ActivationMoments,
    neuron_statistic,
    pool_moments,
    select_moments,
)
from lightning_actprune._types import ModuleSlice, PrunableLayer, register_unit

Scale = Literal["std", "mean"]
"""How standardised scores are put on one scale (:attr:`NeuronScorer.scale`)."""


class NeuronScorer:
    """The criterion a neuron is kept by: one score per neuron of a layer; neurons scoring below λ are removed.

    Subclass it and implement :meth:`__call__` to prune by your own criterion; pass an instance as
    ``ActivationPruning(statistic=...)`` or :func:`~lightning_actprune.core.plan_pruning`, or in a LightningCLI
    YAML file as ``statistic: {class_path: mypackage.MyScorer, init_args: {...}}``. The built-in
    :data:`~lightning_actprune.STATISTICS` are instances of it.

    Attributes:
        name: recorded in the plan (``PruningPlan.statistic``) and the summary; by default the class path.
        signed: whether scores can be negative, so that λ may be too (a negative λ is refused otherwise).
        unit: the scores' unit, for the summary (by default the name is shown).
        moments: the activation moments it reads (of :data:`~lightning_actprune._statistics.MOMENTS`; by default
            all): only these need to be recorded (:func:`recorded_moments`).
        scale: how ``normalize`` puts each layer's scores on one scale: ``"std"`` (default) standardises them,
            ``(s - mean) / std``, λ in standard deviations; ``"mean"`` divides them by their mean, λ in multiples of
            the layer's mean score (for scores that are never negative: 1 is an average neuron of its layer, 0 one
            that contributes nothing).

    Example:
        >>> from lightning_actprune.core import find_prunable_layers, plan_pruning
        >>> class OutputWeightNorm(NeuronScorer):
        ...     '''The L2 norm of the weight row that produces each neuron (needs no activations).'''
        ...     unit = "weight L2 norm"
        ...     def __call__(self, layer, moments, model):
        ...         (producer,) = layer.producers
        ...         return model.get_submodule(producer).weight.detach().norm(dim=1)
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.1, 0.0], [1.0, 0.0]]))
        >>> layers = find_prunable_layers(model, torch.randn(4, 2))
        >>> plan = plan_pruning(layers, {}, threshold=0.5, statistic=OutputWeightNorm(), model=model)
        >>> plan.layers[0].kept
        (0, 2)
    """

    name: str = ""
    signed: bool = False
    unit: str = ""
    moments: tuple[str, ...] = MOMENTS
    scale: Scale = "std"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = f"{cls.__module__}.{cls.__qualname__}"
        if cls.unit:
            register_unit(cls.name, cls.unit)

    def __call__(self, layer: PrunableLayer, moments: Mapping[str, ActivationMoments], model: nn.Module) -> Tensor:
        """One score per neuron of ``layer`` (higher is kept), a tensor of shape ``(layer.neurons,)``.

        Args:
            layer: the neurons to score, with the modules that produce (``layer.producers``) and read
                (``layer.consumers``) them.
            moments: the activation moments measured at the input of every ``Linear``/``Conv``, by module name; a
                neuron's are at ``moments[consumer.module]`` entries ``consumer.indices`` (see :class:`ModuleSlice`).
            model: the model, to read weights from.
        """
        raise NotImplementedError

    def pooled_layers(self, layers: Sequence[PrunableLayer], model: nn.Module) -> dict[str, str]:
        """Layers scored by another criterion, whose scores are put on one scale together rather than each on its own.

        When scores are put on one scale (``normalize``), each layer listed here is put on the scale of all the
        layers listed with the same criterion (their scores pooled: one mean, and one standard deviation with
        ``scale="std"``), the others on their own. The plan records the mapping (``PruningPlan.scored_by``) and the
        summary shows it. By default none: every layer is scored by this scorer and put on its own scale.

        Returns:
            Layer name → the criterion that scored it.
        """
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _over_consumers(
    layer: PrunableLayer,
    moments: Mapping[str, ActivationMoments],
    score: Callable[[ModuleSlice, ActivationMoments, Tensor, Tensor], Tensor],
    needed: Sequence[str] = MOMENTS,
) -> Tensor:
    """``score(consumer, moments of the neuron's inputs, feature index, neuron index)``, the largest over consumers.

    A neuron that reaches several consumers (a residual stream) stays when any of them sees it active. Only the
    ``needed`` moments are selected for ``score``; the others are NaN.
    """
    scores: Tensor | None = None
    for consumer in layer.consumers:
        if consumer.module not in moments:
            continue
        feature_moments = moments[consumer.module]
        index = index_tensor(consumer.indices).to(feature_moments.mean.device)
        neuron_index = index_tensor(consumer.neurons).to(index.device)
        selected = select_moments(feature_moments, index, needed)
        value = score(consumer, selected, index, neuron_index)
        scores = value if scores is None else torch.maximum(scores, value)
    if scores is None:
        raise ActivationPruningError(
            f"no activations were recorded for the consumers of {layer.name} "
            f"({', '.join(c.module for c in layer.consumers)}): did the validation pass call them?"
        )
    return scores


class MomentStatistic(NeuronScorer):
    """A statistic of each neuron's activations alone (:func:`neuron_statistic`), the largest over its consumers.

    A conv channel flattened into a Linear is averaged over its positions.
    """

    def __init__(self, name: str, signed: bool = False) -> None:
        self.name = name
        self.signed = signed
        self.moments = STATISTIC_MOMENTS[name]

    def __call__(
        self, layer: PrunableLayer, moments: Mapping[str, ActivationMoments], model: nn.Module | None = None
    ) -> Tensor:
        """The statistic of every neuron of ``layer``; ``model`` is not needed."""
        return _over_consumers(
            layer,
            moments,
            lambda consumer, selected, index, neuron_index: neuron_statistic(
                pool_moments(selected, neuron_index, layer.neurons, self.moments), self.name
            ),
            self.moments,
        )

    def __repr__(self) -> str:
        return f"MomentStatistic({self.name!r})"


class Fluctuation(NeuronScorer):
    """FLAP's fluctuation: the activation variance times the squared norm of the consumer's weight column.

    Summed over a neuron's positions: the energy the neuron's fluctuations put into the consumer's output, in
    squared output units.
    """

    name = "fluctuation"
    moments = STATISTIC_MOMENTS["fluctuation"]

    def __call__(self, layer: PrunableLayer, moments: Mapping[str, ActivationMoments], model: nn.Module) -> Tensor:
        """The fluctuation of every neuron of ``layer``, from ``moments`` and the consumers' weights in ``model``."""

        def energy(consumer: ModuleSlice, selected: ActivationMoments, index: Tensor, neuron_index: Tensor) -> Tensor:
            norms = _squared_column_norms(model.get_submodule(consumer.module)).to(index.device, torch.float64)
            values = neuron_statistic(selected, self.name) * norms[index]
            return torch.zeros(layer.neurons, dtype=torch.float64, device=index.device).index_add_(
                0, neuron_index, values
            )

        return _over_consumers(layer, moments, energy, self.moments)


SCORERS: dict[str, NeuronScorer] = {
    name: Fluctuation() if name == "fluctuation" else MomentStatistic(name, signed=name in SIGNED_STATISTICS)
    for name in STATISTICS
}
"""The built-in statistics, by name."""


BATCHNORM_CRITERION = "rms"
"""What scores channels followed by BatchNorm under the default criterion (:class:`DefaultCriterion`)."""


def normalized_by_batchnorm(layer: PrunableLayer, model: nn.Module) -> bool:
    """Whether a BatchNorm layer normalises ``layer``'s neurons (it is sliced with them: it follows a producer)."""
    return any(
        s.dim == "out" and isinstance(model.get_submodule(s.module), _BatchNorm)
        for s in layer.slices
        if s.module not in layer.producers
    )


class DefaultCriterion(Fluctuation):
    """The criterion when the callback picks λ and no ``statistic`` is named: one scale for every kind of unit.

    Each unit (a neuron, a channel, an attention head) is scored by the energy it puts into its consumers' outputs,
    divided by the mean of its layer's (``scale="mean"``): 1 is an average unit of its layer, 0.1 one that carries a
    tenth of that, whatever the layer's size, depth or kind. An FFN neuron and an attention head (whose fluctuation
    is the sum over its value dimensions into the output projection) are then compared by how much of their own
    layer's output each carries, relative to their siblings, so a head goes only where it carries less than its
    share, not because it is the lowest of four. The energy is FLAP's fluctuation (activation variance × squared
    norm of the consumer's weight column). On the issue-21 ViT at −30 % this removed 1 head of 24 where the per-layer
    standardised fluctuation used before removed 9, and kept 81.97 ± 0.62 % one-shot against 76.36 ± 2.48 % (3 seeds,
    BENCHMARKS.md).

    Channels normalised by BatchNorm are scored by their RMS activation instead (after BatchNorm, their scale is the
    one BatchNorm's learned weight and bias set, the same kind of unit in every such layer), pooled: divided by one
    mean over every BatchNorm-normalised channel, so their ranking across layers is the raw RMS's (which won on the
    BatchNorm ResNet benchmark). Its name stays ``fluctuation``; the plan lists the layers RMS scored.
    """

    name = "fluctuation"
    scale: Scale = "mean"

    def __call__(self, layer: PrunableLayer, moments: Mapping[str, ActivationMoments], model: nn.Module) -> Tensor:
        """RMS for a BatchNorm-normalised layer, fluctuation otherwise."""
        if normalized_by_batchnorm(layer, model):
            return SCORERS[BATCHNORM_CRITERION](layer, moments, model)
        return super().__call__(layer, moments, model)

    def pooled_layers(self, layers: Sequence[PrunableLayer], model: nn.Module) -> dict[str, str]:
        """The BatchNorm-normalised layers, scored by RMS."""
        return {layer.name: BATCHNORM_CRITERION for layer in layers if normalized_by_batchnorm(layer, model)}

    def __repr__(self) -> str:
        return "DefaultCriterion()"


DEFAULT_CRITERION = DefaultCriterion()
"""The rule for ``statistic=None`` when the callback picks λ (with ``normalize`` not ``False``)."""


def as_scorer(statistic: object) -> NeuronScorer:
    """``statistic`` as a scorer: one of :data:`STATISTICS` by name, or a :class:`NeuronScorer` as it is."""
    allowed = f"one of {', '.join(STATISTICS)} or a NeuronScorer instance"
    if isinstance(statistic, str) and statistic in SCORERS:
        return SCORERS[statistic]
    if not isinstance(statistic, NeuronScorer):
        raise ActivationPruningError(f"`statistic` can be {allowed}; got {statistic!r}.")
    if type(statistic).__call__ is NeuronScorer.__call__:
        raise ActivationPruningError(
            f"`statistic` can be {allowed} that implements `__call__`; got {statistic!r}, which does not."
        )
    return statistic


def recorded_moments(statistic: str | NeuronScorer, compensate: bool = False) -> tuple[str, ...]:
    """The activation moments a prune with ``statistic`` reads.

    The statistic's own, ``mean_square`` for the tie-break of a target search (RMS activation), and ``mean`` with
    ``compensate`` (the removed neurons' means go into their consumers' biases). Pass them to
    :class:`~lightning_actprune.core.ActivationRecorder` (``moments=``): each moment left out saves a pass over every
    layer's activations per batch.
    """
    needed = {*as_scorer(statistic).moments, "mean_square", *(("mean",) if compensate else ())}
    return tuple(m for m in MOMENTS if m in needed)


class _Cache(NamedTuple):
    norms: dict[int, tuple[tuple[nn.Parameter, ...], Tensor]]
    """Squared column norms by ``id`` of the module, with its parameters (held: a surgery replaces them)."""
    indices: dict[int, tuple[Sequence[int], Tensor]]
    """Index tensors by ``id`` of the tuple they were made from (held, likewise)."""


_CACHE: ContextVar[_Cache | None] = ContextVar("planning_cache", default=None)


@contextmanager
def planning_cache() -> Iterator[None]:
    """Inside it, each consumer's column norms and each index tuple's tensor are computed once.

    A DenseNet layer is read by every later layer of its block: its norms serve all of them. The weights and the
    layers must not change inside it: it is entered around computations that only read them.
    """
    token = _CACHE.set(_CACHE.get() or _Cache({}, {}))
    try:
        yield
    finally:
        _CACHE.reset(token)


def index_tensor(values: Sequence[int]) -> Tensor:
    """``values`` as an int64 tensor on the CPU; a tuple's tensor is made once inside :func:`planning_cache`."""
    cache = _CACHE.get()
    if cache is not None and id(values) in cache.indices:
        return cache.indices[id(values)][1]
    if not values:
        return torch.zeros(0, dtype=torch.int64)
    # through an array: several times faster than torch.tensor on a tuple of Python ints
    tensor = torch.frombuffer(array.array("q", values), dtype=torch.int64)
    if cache is not None and isinstance(values, tuple):
        cache.indices[id(values)] = (values, tensor)
    return tensor


def _by_input(module: nn.Module, over_kernel: Callable[[Tensor], Tensor]) -> Tensor:
    """``over_kernel`` of the weights joining each input feature to each output, ``(in, out)``.

    A grouped conv joins an input only to its own group's outputs: the other entries are zero.
    """
    weight = out_in_weight(module).detach()
    per_pair = over_kernel(weight.flatten(2) if weight.dim() > 2 else weight.unsqueeze(-1))  # (out, in/groups)
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return per_pair.t().contiguous()
    out_channels, in_per_group = per_pair.shape
    out_per_group = out_channels // groups
    # block-diagonal: group g's inputs and outputs, written in one indexing instead of a loop over the groups
    joined = torch.zeros(groups, in_per_group, groups, out_per_group, dtype=per_pair.dtype, device=per_pair.device)
    diagonal = torch.arange(groups, device=per_pair.device)
    joined[diagonal, :, diagonal, :] = per_pair.view(groups, out_per_group, in_per_group).transpose(1, 2)
    return joined.view(in_per_group * groups, out_channels)


def input_columns(module: nn.Module) -> Tensor:
    """Each input feature's weight column of a ``Linear``/``Conv``, summed over the kernel: ``(in, out)``.

    What one unit of constant activation at input ``f`` adds to each output: ``W[:, f]`` for a Linear (``W[f]`` for
    Hugging Face's transposed ``Conv1D``), the kernel
    sum ``Σ_k W[:, f, k]`` for a Conv (grouped convs only reach their own group's outputs).
    """
    if isinstance(module, nn.RNNBase):  # its inputs: features, then hidden units (see _recurrent)
        return recurrent.input_columns(module)
    return _by_input(module, lambda kernel: kernel.sum(-1))


def _squared_column_norms(module: nn.Module) -> Tensor:
    """``‖W[:, f]‖²`` for each input feature ``f``, over every output and kernel position.

    Computed once per module inside :func:`planning_cache`.
    """
    cache = _CACHE.get()
    parameters = tuple(module.parameters(recurse=False))
    if cache is not None and id(module) in cache.norms:
        held, norms = cache.norms[id(module)]
        if len(held) == len(parameters) and all(a is b for a, b in zip(held, parameters, strict=True)):
            return norms
    if isinstance(module, nn.RNNBase):
        norms = recurrent.squared_column_norms(module)
    else:
        norms = _by_input(module, lambda kernel: kernel.square().sum(-1)).sum(1)
    if cache is not None:
        cache.norms[id(module)] = (parameters, norms)
    return norms
