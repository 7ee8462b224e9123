"""Per-neuron activation statistics: a torchmetrics ``Metric`` and the pure math beside it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_actprune._conv1d import Conv1D
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import measurable_attention
from lightning_actprune._recurrent import recurrent_features

Statistic = Literal["mean", "mean_abs", "rms", "nonzero_fraction", "std", "fluctuation"]
"""The per-neuron statistics λ can be compared against."""

STATISTICS: tuple[str, ...] = get_args(Statistic)

SIGNED_STATISTICS: tuple[str, ...] = ("mean",)
"""Statistics that can be negative (the mean of GELU, SiLU, hardswish or tanh outputs): λ may be too."""

MEASURED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D, nn.RNNBase)
"""Layers whose *inputs* are measured: a neuron's activation is what its consumers receive.

``Conv1D`` is Hugging Face's transposed Linear (GPT-2), recognised without importing ``transformers``. A recurrent
layer (``nn.LSTM``/``nn.GRU``/``nn.RNN``) reads its input features and its own hidden units at every time step: both
are measured (:func:`lightning_actprune._recurrent.recurrent_features`).
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


def pool_moments(
    moments: ActivationMoments, index: Tensor, size: int, needed: Sequence[str] | None = None
) -> ActivationMoments:
    """Average the moments of several inputs that belong to one neuron.

    A conv channel that is flattened into a Linear reaches it as ``H*W`` input features; the channel's moments
    are the average over those features (every feature saw the same number of values).

    Args:
        moments: moments of the consumer's input features.
        index: for each input feature, the neuron it belongs to (``0 <= index < size``).
        size: the number of neurons.
        needed: the moments to pool (of :data:`MOMENTS`; default all); the others come back NaN.

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
        **_each_moment(moments, pool, needed, lambda: torch.full_like(divisor, math.nan)),
        num_values=moments.num_values * features_per_neuron,
    )


def select_moments(moments: ActivationMoments, index: Tensor, needed: Sequence[str] | None = None) -> ActivationMoments:
    """The moments of the features ``index`` (of :data:`MOMENTS` the ``needed`` ones, default all; others NaN)."""
    return ActivationMoments(
        **_each_moment(
            moments,
            lambda values: values[index],
            needed,
            lambda: torch.full(index.shape, math.nan, dtype=moments.mean.dtype, device=moments.mean.device),
        ),
        num_values=moments.num_values,
    )


def _each_moment(
    moments: ActivationMoments,
    transform: Callable[[Tensor], Tensor],
    needed: Sequence[str] | None,
    missing: Callable[[], Tensor],
) -> dict[str, Tensor]:
    """``transform`` of each moment of :data:`MOMENTS` in ``needed`` (all when ``None``); ``missing()`` for the rest.

    A scorer reads only its own moments: the others would cost an index or a pool per consumer for nothing.
    """
    absent: Tensor | None = None
    values = {}
    for name in MOMENTS:
        if needed is None or name in needed:
            values[name] = transform(getattr(moments, name))
        else:
            absent = missing() if absent is None else absent
            values[name] = absent
    return values


def _check_statistic(statistic: str) -> None:
    if statistic not in STATISTICS:
        raise ActivationPruningError(f"`statistic` can be one of {', '.join(STATISTICS)}; got {statistic!r}.")


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps sums of squares exact enough over millions of values; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


MOMENTS: tuple[str, ...] = ("mean", "mean_abs", "mean_square", "nonzero_fraction")
"""The per-neuron moments a recorder can accumulate (``num_values`` is always counted)."""

STATISTIC_MOMENTS: dict[str, tuple[str, ...]] = {
    "mean": ("mean",),
    "mean_abs": ("mean_abs",),
    "rms": ("mean_square",),
    "nonzero_fraction": ("nonzero_fraction",),
    "std": ("mean", "mean_square"),
    "fluctuation": ("mean", "mean_square"),
}
"""The moments each statistic is computed from."""

_STATES: dict[str, str] = {
    "mean": "total",
    "mean_abs": "total_abs",
    "mean_square": "total_squares",
    "nonzero_fraction": "nonzero",
}


def check_moments(moments: Sequence[str]) -> tuple[str, ...]:
    """``moments`` in :data:`MOMENTS`' order, or an error naming the allowed ones."""
    unknown = [m for m in moments if m not in MOMENTS]
    if unknown or isinstance(moments, str):
        raise ActivationPruningError(f"`moments` can hold {', '.join(MOMENTS)}; got {moments!r}.")
    return tuple(m for m in MOMENTS if m in moments)


class Workspace:
    """One scratch buffer for the temporaries of every layer's statistics, reused from batch to batch.

    On the CPU a large temporary costs page faults each time it is allocated, as much as the arithmetic on it;
    a recorder hands one workspace to all its metrics, which grows to the largest activation and is released
    with the recorder.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def like(self, values: Tensor) -> Tensor:
        """An uninitialised tensor of ``values``' shape, dtype and device, backed by the shared buffer."""
        buffer = self._buffer
        if (
            buffer is None
            or buffer.numel() < values.numel()
            or (buffer.dtype, buffer.device)
            != (
                values.dtype,
                values.device,
            )
        ):
            buffer = self._buffer = torch.empty(values.numel(), dtype=values.dtype, device=values.device)
        return buffer[: values.numel()].view(values.shape)

    def release(self) -> None:
        """Free the buffer (the next :meth:`like` allocates again)."""
        self._buffer = None


def _channel_matrix(values: Tensor, channel_dim: int) -> tuple[Tensor, bool]:
    """``values`` as a matrix without copying when its layout allows, and whether channels are its rows.

    Channels last in memory (``Linear`` inputs): ``(samples × positions, channels)``, summed over rows. Channels
    before contiguous positions (``Conv`` inputs, ``NC…``): ``(samples × channels, positions)``, summed over columns
    (contiguous, the fastest reduction) and then over samples; no ``movedim`` copy.
    """
    dim = channel_dim % values.dim()
    channels = values.shape[dim]
    last = values.movedim(dim, -1)
    if dim == values.dim() - 1 or last.is_contiguous():
        return last.reshape(-1, channels), False
    positions = math.prod(values.shape[dim + 1 :])
    return values.reshape(-1, positions), True


def batch_sums(
    activations: Tensor, channel_dim: int, moments: Sequence[str] = MOMENTS, workspace: Workspace | None = None
) -> tuple[Tensor, int]:
    """Per-channel sums of one batch, one row per moment of ``moments`` (in :data:`MOMENTS`' order), and the count.

    The sums of ``a``, ``|a|``, ``a²`` and ``a != 0`` over every dimension but ``channel_dim``, in float32 or wider.
    Each is one reduction kernel over the activations in place; ``|a|`` and ``a != 0`` share one temporary (in
    ``workspace`` when given). On the CPU, where checking costs no synchronisation, activations that are never
    negative (after a ReLU) take ``Σ|a|`` from ``Σa`` and count the non-zeros on ``sign(a)``.

    Returns:
        ``(sums, count)``: a ``(len(moments), channels)`` tensor, and how many values each channel saw.
    """
    values = activations.detach()
    # one batch is summed in float32 or wider (bf16/fp16 are upcast), the running totals are float64
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    matrix, by_rows = _channel_matrix(values, channel_dim)
    channels = values.shape[channel_dim]
    reduce = -1 if by_rows else 0
    sums: dict[str, Tensor] = {}
    if "mean" in moments:
        sums["mean"] = matrix.sum(reduce)
    if "mean_square" in moments:
        # rows: the fused norm reads the values once; columns: the square in a temporary, as its kernel is slow there
        sums["mean_square"] = (
            torch.linalg.vector_norm(matrix, 2, reduce).square()
            if by_rows
            else torch.square(matrix, out=_scratch(workspace, matrix)).sum(0)
        )
    if "mean_abs" in moments or "nonzero_fraction" in moments:
        scratch = _scratch(workspace, matrix)
        if matrix.device.type == "cpu" and bool(matrix.min() >= 0):  # NaN compares False: the general path
            if "mean_abs" in moments:
                sums["mean_abs"] = sums["mean"] if "mean" in moments else matrix.sum(reduce)
            torch.sign(matrix, out=scratch)
        else:
            torch.abs(matrix, out=scratch)
            if "mean_abs" in moments:
                sums["mean_abs"] = scratch.sum(reduce)
            scratch.sign_()  # on CPU several times faster than count_nonzero or (a != 0).sum
        if "nonzero_fraction" in moments:
            sums["nonzero_fraction"] = scratch.sum(reduce)
    if not sums:
        return matrix.new_zeros(0, channels), matrix.numel() // channels
    stacked = torch.stack([sums[m] for m in MOMENTS if m in moments])
    if by_rows:
        stacked = stacked.view(len(sums), -1, channels).sum(1)
    return stacked, matrix.numel() // channels


def _scratch(workspace: Workspace | None, like: Tensor) -> Tensor:
    return workspace.like(like) if workspace is not None else torch.empty_like(like)


class ActivationStatistics(Metric):
    """Running per-neuron sums of one layer's input activations.

    Memory is O(neurons): up to five sums (the count and one per moment), accumulated on the activations' device
    in float64 (float32 on MPS), with no host synchronisation per batch. Across processes every state is reduced
    with ``sum``.

    Args:
        num_neurons: the size of the channel dimension.
        channel_dim: where the neurons are: ``-1`` for ``Linear`` inputs, ``1`` for batched ``Conv`` inputs.
        moments: the moments to accumulate (a subset of :data:`MOMENTS`, by default all); each one left out saves a
            pass over every batch, and :meth:`compute` returns it as NaN.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Attributes:
        workspace: a :class:`Workspace` for the temporaries of :meth:`update` (``None``: allocated per batch).

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

    def __init__(
        self, num_neurons: int, channel_dim: int = -1, moments: Sequence[str] = MOMENTS, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_neurons, int) or num_neurons < 1:
            raise ActivationPruningError(f"`num_neurons` must be a positive int; got {num_neurons!r}.")
        self.num_neurons = num_neurons
        self.channel_dim = channel_dim
        self.moments = check_moments(moments)
        self.workspace: Workspace | None = None
        dtype = torch.float64
        for moment in self.moments:  # only the sums it accumulates: a recorder makes hundreds of these per pass
            self.add_state(_STATES[moment], default=torch.zeros(num_neurons, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        """Accumulate one batch of activations (any shape with ``num_neurons`` at ``channel_dim``)."""
        if activations.shape[self.channel_dim] != self.num_neurons:
            raise ActivationPruningError(
                f"expected {self.num_neurons} neurons at dim {self.channel_dim}; got shape {tuple(activations.shape)}."
            )
        sums, count = batch_sums(activations, self.channel_dim, self.moments, self.workspace)
        # in place: an assignment would go through nn.Module's and torchmetrics' __setattr__ for every state
        states = [getattr(self, _STATES[m]) for m in self.moments]
        if states:
            torch._foreach_add_(states, list(sums.to(states[0].dtype).unbind(0)))
        self.count.add_(count)

    def compute(self) -> ActivationMoments:
        """Divide the sums by the number of values seen; a moment not accumulated is NaN."""
        count = self.count
        divisor = count.clamp_min(1)

        def moment(name: str) -> Tensor:
            if name not in self.moments:
                return torch.full((self.num_neurons,), math.nan, dtype=count.dtype, device=count.device)
            return getattr(self, _STATES[name]) / divisor

        return ActivationMoments(
            mean=moment("mean"),
            mean_abs=moment("mean_abs"),
            mean_square=moment("mean_square"),
            nonzero_fraction=moment("nonzero_fraction"),
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
    """Context manager that measures the input of every ``Linear``/``Conv``/recurrent layer of a model.

    While active, every forward call updates one :class:`ActivationStatistics` per measured layer (keyed by the
    layer's module name) and remembers the first call's arguments of the model and of each submodule that holds
    a measured layer: the examples the dependency analysis traces with. Gradients are never needed. A recurrent
    layer's statistics hold its input features, then its hidden units, each over every time step of every sequence
    (padding of a ``PackedSequence`` excluded).

    Args:
        model: any ``nn.Module``.
        moments: the moments to accumulate (a subset of :data:`MOMENTS`, by default all): a statistic needs only
            its own (:data:`STATISTIC_MOMENTS`, :func:`~lightning_actprune._scoring.recorded_moments`), and each one
            left out saves a pass over every layer's activations per batch.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with ActivationRecorder(model) as recorder, torch.no_grad():
        ...     _ = model(torch.ones(5, 3))
        >>> recorder.moments()["2"].mean.shape
        torch.Size([4])
    """

    def __init__(self, model: nn.Module, moments: Sequence[str] = MOMENTS) -> None:
        self.model = model
        self.recorded = check_moments(moments)
        self.metrics: dict[str, ActivationStatistics] = {}
        self._workspace = Workspace()
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
            if isinstance(module, nn.RNNBase):
                hook = self._recurrent_hook(name)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
            elif isinstance(module, MEASURED_TYPES):
                self._handles.append(module.register_forward_pre_hook(self._measure_hook(name)))
            elif any(isinstance(m, MEASURED_TYPES) for m in module.modules()):
                self._handles.append(module.register_forward_pre_hook(self._capture_hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._swapped.close()
        self._workspace.release()

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
                metric = ActivationStatistics(int(inputs.shape[dim]), channel_dim=dim, moments=self.recorded)
                self.metrics[name] = self._placed(metric, inputs.device)
            metric.update(inputs)

        return hook

    def _placed(self, metric: ActivationStatistics, device: torch.device) -> ActivationStatistics:
        """``metric`` on the activations' device, in its accumulator dtype, with the shared workspace."""
        if metric.device != device:  # each move walks every state: skipped where it would change nothing
            metric = metric.to(device)
        if metric.count.dtype != _accumulator_dtype(device):
            metric.set_dtype(_accumulator_dtype(device))
        metric.workspace = self._workspace
        return metric

    def _recurrent_hook(self, name: str) -> Any:
        def hook(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            features = recurrent_features(module, args, kwargs, output)
            metric = self.metrics.get(name)
            if metric is None:
                metric = ActivationStatistics(int(features.shape[-1]), moments=self.recorded)
                self.metrics[name] = self._placed(metric, features.device)
            metric.update(features)

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
        bad = [
            name
            for name, m in moments.items()
            if not all(bool(torch.isfinite(getattr(m, moment)).all()) for moment in self.recorded)
        ]
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
