"""Per-neuron activation statistics: a torchmetrics ``Metric`` and the pure math beside it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_actprune._conv1d import Conv1D
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import measurable_attention

Statistic = Literal["mean", "mean_abs", "rms", "nonzero_fraction", "std", "fluctuation"]
"""The per-neuron statistics λ can be compared against."""

STATISTICS: tuple[str, ...] = get_args(Statistic)

SIGNED_STATISTICS: tuple[str, ...] = ("mean",)
"""Statistics that can be negative (the mean of GELU, SiLU, hardswish or tanh outputs): λ may be too."""

MEASURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)
"""Layers whose *inputs* are measured: a neuron's activation is what its consumers receive.

``Conv1D`` is Hugging Face's transposed Linear (GPT-2), recognised without importing ``transformers``.
"""

FEATURES_LAST: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Measured layers that read their input features on the last dimension."""


class ActivationMoments(NamedTuple):
    """Per-neuron moments of the activations, each averaged over samples and positions.

    Attributes:
        mean: ``E[a]``, in activation units.
        mean_abs: ``E[|a|]``, in activation units.
        mean_square: ``E[a²]``, in squared activation units.
        nonzero_fraction: ``P(a != 0)``, in [0, 1] (1 − APoZ).
        num_values: how many values each neuron saw (samples × positions).
    """

    mean: Tensor
    mean_abs: Tensor
    mean_square: Tensor
    nonzero_fraction: Tensor
    num_values: Tensor


def neuron_statistic(moments: ActivationMoments, statistic: str) -> Tensor:
    """Turn moments into the named per-neuron statistic.

    Units: ``mean``, ``mean_abs``, ``rms`` and ``std`` are in the activation's own units (so λ is too);
    ``nonzero_fraction`` is a fraction in [0, 1]. ``fluctuation`` needs the consumer's weights: here it is the
    variance (squared activation units), which :func:`layer_scores` multiplies by the squared weight-column norm.

    Args:
        moments: the moments of one layer's neurons.
        statistic: one of :data:`STATISTICS`.

    Returns:
        A float tensor with one value per neuron.

    Example:
        >>> m = ActivationMoments(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0]),
        ...                       torch.tensor([0.5]), torch.tensor(4.0))
        >>> neuron_statistic(m, "std")
        tensor([1.])
    """
    _check_statistic(statistic)
    return _OF_MOMENTS[statistic](moments)


def _variance(moments: ActivationMoments) -> Tensor:
    return (moments.mean_square - moments.mean.square()).clamp_min(0)


_OF_MOMENTS: dict[str, Callable[[ActivationMoments], Tensor]] = {
    "mean": lambda moments: moments.mean,
    "mean_abs": lambda moments: moments.mean_abs,
    "rms": lambda moments: moments.mean_square.sqrt(),
    "nonzero_fraction": lambda moments: moments.nonzero_fraction,
    "std": lambda moments: _variance(moments).sqrt(),
    "fluctuation": _variance,
}


def pool_moments(moments: ActivationMoments, index: Tensor, size: int) -> ActivationMoments:
    """Average the moments of several inputs that belong to one neuron.

    A conv channel that is flattened into a Linear reaches it as ``H*W`` input features; the channel's moments
    are the average over those features (every feature saw the same number of values).

    Args:
        moments: moments of the consumer's input features.
        index: for each input feature, the neuron it belongs to (``0 <= index < size``).
        size: the number of neurons.

    Returns:
        Moments with one entry per neuron; ``num_values`` is multiplied by the features per neuron.
    """
    index = index.to(moments.mean.device)
    features_per_neuron = torch.zeros(size, dtype=moments.mean.dtype, device=index.device)
    features_per_neuron.index_add_(0, index, torch.ones_like(index, dtype=moments.mean.dtype))
    divisor = features_per_neuron.clamp_min(1)

    def pool(values: Tensor) -> Tensor:
        pooled = torch.zeros(size, dtype=values.dtype, device=values.device)
        return pooled.index_add_(0, index, values) / divisor

    return ActivationMoments(
        mean=pool(moments.mean),
        mean_abs=pool(moments.mean_abs),
        mean_square=pool(moments.mean_square),
        nonzero_fraction=pool(moments.nonzero_fraction),
        num_values=moments.num_values * features_per_neuron,
    )


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ActivationPruningError(f"`statistic` can be one of {', '.join(STATISTICS)}; got {statistic!r}.")


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums of squares exact enough over millions of values; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


class ActivationStatistics(Metric):
    """Running per-neuron sums of one layer's input activations.

    Memory is O(neurons): five sums, accumulated on the activations' device in float64 (float32 on MPS), with no
    host synchronisation per batch. Across processes every state is reduced with ``sum``.

    Args:
        num_neurons: the size of the channel dimension.
        channel_dim: where the neurons are: ``-1`` for ``Linear`` inputs, ``1`` for batched ``Conv`` inputs.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = ActivationStatistics(num_neurons=2)
        >>> metric.update(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> metric.compute().mean
        tensor([1., 2.], dtype=torch.float64)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    total_squares: Tensor
    total_abs: Tensor
    nonzero: Tensor
    count: Tensor

    def __init__(self, num_neurons: int, channel_dim: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_neurons, int) or num_neurons < 1:
            raise ActivationPruningError(f"`num_neurons` must be a positive int; got {num_neurons!r}.")
        self.num_neurons = num_neurons
        self.channel_dim = channel_dim
        dtype = torch.float64
        for name in ("total", "total_squares", "total_abs", "nonzero"):
            self.add_state(name, default=torch.zeros(num_neurons, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        """Accumulate one batch of activations (any shape with ``num_neurons`` at ``channel_dim``)."""
        if activations.shape[self.channel_dim] != self.num_neurons:
            raise ActivationPruningError(
                f"expected {self.num_neurons} neurons at dim {self.channel_dim}; got shape {tuple(activations.shape)}."
            )
        values = activations.detach().movedim(self.channel_dim, -1).reshape(-1, self.num_neurons)
        # one batch is summed in float32 or wider (bf16/fp16 are upcast), the running totals are float64
        values = values.to(torch.promote_types(values.dtype, torch.float32))
        absolute = values.abs()
        self.total += values.sum(0)
        self.total_squares += values.square().sum(0)
        self.total_abs += absolute.sum(0)
        self.nonzero += absolute.sign().sum(0)  # on CPU several times faster than count_nonzero or (a != 0).sum
        self.count += values.shape[0]

    def compute(self) -> ActivationMoments:
        """Divide the sums by the number of values seen."""
        count = self.count
        divisor = count.clamp_min(1)
        return ActivationMoments(
            mean=self.total / divisor,
            mean_abs=self.total_abs / divisor,
            mean_square=self.total_squares / divisor,
            nonzero_fraction=self.nonzero / divisor,
            num_values=count,
        )


def _as_vectors(moments: ActivationMoments) -> ActivationMoments:
    # torchmetrics squeezes one-element results to 0-d: a layer with a single input is still a vector
    return moments._replace(**{k: v.reshape(-1) for k, v in moments._asdict().items() if k != "num_values"})


def _channel_dim(module: nn.Module, inputs: Tensor) -> int:
    if isinstance(module, FEATURES_LAST):
        return -1
    spatial_dims = len(module.kernel_size) if isinstance(module, nn.modules.conv._ConvNd) else 0
    return 1 if inputs.dim() == spatial_dims + 2 else 0


class ActivationRecorder:
    """Context manager that measures the input of every ``Linear``/``Conv`` layer of a model.

    While active, every forward call updates one :class:`ActivationStatistics` per measured layer (keyed by the
    layer's module name) and remembers the first call's arguments of the model and of each submodule that holds
    a measured layer: the examples the dependency analysis traces with. Gradients are never needed.

    Args:
        model: any ``nn.Module``.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with ActivationRecorder(model) as recorder, torch.no_grad():
        ...     _ = model(torch.ones(5, 3))
        >>> recorder.moments()["2"].mean.shape
        torch.Size([4])
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.metrics: dict[str, ActivationStatistics] = {}
        self.example_inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._model_inputs: set[int] = set()
        self._swapped = ExitStack()  # nn.MultiheadAttention calls its out projection only inside

    def __enter__(self) -> ActivationRecorder:
        self._swapped.enter_context(measurable_attention(self.model))
        # the model's own inputs are data, not any neuron's activation: measuring them would be wasted work
        self._handles.append(self.model.register_forward_pre_hook(self._note_model_inputs, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._forget_model_inputs))
        for name, module in self.model.named_modules():
            if isinstance(module, MEASURED_TYPES):
                self._handles.append(module.register_forward_pre_hook(self._measure_hook(name)))
            elif any(isinstance(m, MEASURED_TYPES) for m in module.modules()):
                self._handles.append(module.register_forward_pre_hook(self._capture_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._swapped.close()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside, the model's calls are not recorded (the sums so far are kept); outside, recording goes on."""
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()

    def _measure_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor) or id(args[0]) in self._model_inputs:
                return
            inputs = args[0]
            metric = self.metrics.get(name)
            if metric is None:
                dim = _channel_dim(module, inputs)
                metric = ActivationStatistics(int(inputs.shape[dim]), channel_dim=dim).to(inputs.device)
                metric.set_dtype(_accumulator_dtype(inputs.device))
                self.metrics[name] = metric
            metric.update(inputs)

        return hook

    def _note_model_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # ids are only compared while the call runs, when these tensors are alive and their ids unique
        self._model_inputs = {id(v) for v in (*args, *kwargs.values()) if isinstance(v, Tensor)}

    def _forget_model_inputs(self, *_: Any) -> None:
        self._model_inputs = set()

    def _capture_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # a `forward` set on the instance redirects the call (Lightning's DDP wrapper calls `validation_step`
            # through it): those are a step's arguments, not the module's; its submodules' calls are captured
            if name not in self.example_inputs and "forward" not in vars(module):
                self.example_inputs[name] = map_tensors(Tensor.detach, (args, kwargs))

        return hook

    def moments(self) -> dict[str, ActivationMoments]:
        """The moments of every measured layer input (reduced across processes when distributed)."""
        return {name: _as_vectors(metric.compute()) for name, metric in self.metrics.items()}

    def check_finite(self, moments: Mapping[str, ActivationMoments] | None = None) -> None:
        """Raise if any layer saw NaN or Inf activations (in any process), naming the layers.

        Args:
            moments: the result of :meth:`moments`, when already computed (it is not computed and synced again).
        """
        # the reduced moments: every process must come to the same decision, or the others would wait for it
        moments = self.moments() if moments is None else moments
        bad = [name for name, m in moments.items() if not bool(torch.isfinite(m.mean_square).all())]
        if bad:
            raise ActivationPruningError(
                f"activations contain NaN or Inf at the input of {', '.join(bad)}; refusing to prune on them."
            )

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)


def map_tensors(fn: Callable[[Tensor], Tensor], value: Any) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(fn, v) for v in value)
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    return value
