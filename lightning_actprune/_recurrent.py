"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): their input columns and their hidden units.

A recurrent layer reads two things at every time step: its input ``x_t`` (the columns of each layer-0
``weight_ih``) and its own hidden state ``h_{t-1}`` (the columns of ``weight_hh``, and of the next layer's
``weight_ih``). Both are its *inputs* here, numbered ``0 … input_size - 1`` for the features and
``input_size + n`` for hidden unit ``n``, where units are numbered layer by layer and direction by direction:
``n = (layer * directions + direction) * hidden_size + j``. Removing a hidden unit removes, in its layer and
direction, its row in every gate (LSTM i, f, g, o; GRU r, z, n) of ``weight_ih``, ``weight_hh`` and both biases, its
column of ``weight_hh`` (of ``weight_hr`` when the LSTM has a projection, whose ``proj_size`` outputs stay), and its
column in the next layer's ``weight_ih`` (both directions; without a projection). ``hidden_size`` is one number for
every layer and direction, so every (layer, direction) keeps the same number of units: a :class:`PrunableLayer` of
hidden units has ``groups = layers * directions``.

The unit's activation is its hidden state (``o ⊙ tanh(c)`` for an LSTM with a projection), measured at every time
step of every sequence (:func:`recurrent_features`). Zeroing a unit means zeroing its rows of every gate
(:func:`zero_hidden_units`): with the default zero initial state its hidden state then stays 0 at every step (LSTM:
``c_t = ½ c_{t-1}``, ``h = o ⊙ tanh(c) = 0``; GRU: ``n = 0``, ``h_t = ½ h_{t-1}``; RNN: ``tanh(0) = relu(0) = 0``),
so it feeds nothing to the other units, the next layer or the layers that read the outputs: removing it gives the
same outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_actprune._types import ModuleSlice, PrunableLayer

_GATES = {"LSTM": 4, "GRU": 3}


@dataclass(frozen=True)
class RecurrentShape:
    """The sizes of one recurrent module.

    Attributes:
        inputs: ``input_size``.
        hidden: ``hidden_size`` (the cell units of an LSTM with a projection).
        proj: ``proj_size`` (0: none).
        layers: ``num_layers``.
        directions: 2 when bidirectional, else 1.
        gates: rows per unit in each weight (LSTM 4, GRU 3, RNN 1).
    """

    inputs: int
    hidden: int
    proj: int
    layers: int
    directions: int
    gates: int

    @classmethod
    def of(cls, module: nn.RNNBase) -> RecurrentShape:
        """The sizes of ``module``."""
        return cls(
            inputs=int(module.input_size),
            hidden=int(module.hidden_size),
            proj=int(getattr(module, "proj_size", 0) or 0),
            layers=int(module.num_layers),
            directions=2 if module.bidirectional else 1,
            gates=_GATES.get(module.mode, 1),
        )

    @property
    def blocks(self) -> int:
        """``layers * directions``: the blocks of hidden units that keep equal counts."""
        return self.layers * self.directions

    @property
    def units(self) -> int:
        """Every hidden unit of every layer and direction."""
        return self.blocks * self.hidden

    @property
    def outputs(self) -> int:
        """Features of each direction's output: ``proj_size`` or ``hidden_size``."""
        return self.proj or self.hidden

    def layer_inputs(self, layer: int) -> int:
        """The input width of ``layer``: the module's input, or the previous layer's directions' outputs."""
        return self.inputs if layer == 0 else self.directions * self.outputs


def _suffix(direction: int) -> str:
    return "_reverse" if direction else ""


def parameter_name(kind: str, layer: int, direction: int) -> str:
    """``weight_ih_l1_reverse``: the name of one layer and direction's ``kind`` of parameter (``weight_hr``, …)."""
    return f"{kind}_l{layer}{_suffix(direction)}"


def _gate_rows(shape: RecurrentShape, units: Sequence[int]) -> list[int]:
    """The rows of ``units`` (positions within one block) in every gate of a weight or bias, gate by gate."""
    return [gate * shape.hidden + j for gate in range(shape.gates) for j in units]


def refresh_flat_weights(module: nn.RNNBase) -> None:
    """Point the module's flat weight list at its current parameters.

    ``nn.RNNBase`` runs on ``_flat_weights``, a list it keeps beside its parameters and updates *in place* when a
    parameter is assigned; a shallow copy (the optimizer's index probe) shares that list. Parameters are therefore
    put straight into ``_parameters`` and the list is rebuilt, as ``nn.RNNBase`` does itself after ``.to()``.
    """
    module._init_flat_weights()


def _set_parameters(module: nn.RNNBase, parameters: dict[str, nn.Parameter]) -> None:
    for name, parameter in parameters.items():
        module._parameters[name] = parameter
    refresh_flat_weights(module)


def _selected(parameter: Tensor, dims: Sequence[tuple[int, Sequence[int]]]) -> nn.Parameter:
    """``parameter`` keeping the given indices along each dim; ``requires_grad`` and the gradient follow."""
    values, grad = parameter.detach(), parameter.grad
    for dim, keep in dims:
        index = torch.tensor(list(keep), dtype=torch.long, device=parameter.device)
        values = values.index_select(dim, index)
        grad = None if grad is None else grad.index_select(dim, index)
    kept = nn.Parameter(values.clone(), requires_grad=parameter.requires_grad)
    if grad is not None:
        kept.grad = grad.clone()
    return kept


def _kept_units(shape: RecurrentShape, removed: Sequence[int]) -> list[list[int]]:
    """For each block, the positions of its units that stay; every block must keep as many, and at least one."""
    gone = {int(n) for n in removed}
    kept = [[j for j in range(shape.hidden) if b * shape.hidden + j not in gone] for b in range(shape.blocks)]
    counts = sorted({len(k) for k in kept})
    if len(counts) > 1 or counts[0] == 0:
        raise ValueError(
            f"a recurrent layer has one hidden_size for its {shape.layers} layer(s) and {shape.directions}"
            f" direction(s): every one must keep the same number of units (at least one); the removal keeps {counts}"
        )
    return kept


def _placeholder_units(shape: RecurrentShape, kept: list[list[int]]) -> list[int]:
    """Where an LSTM would keep exactly ``proj_size`` units, one removed unit per block stays, silenced.

    PyTorch's LSTM kernel tells a projection from none by comparing the widths of ``h`` and ``c``, and fails when they
    are equal. A unit whose gate rows are all zero keeps its state at zero (as in :func:`zero_hidden_units`), so the
    layer computes exactly what the plan's units alone compute. Returns each block's position of that unit.
    """
    if not shape.proj or len(kept[0]) != shape.proj or len(kept[0]) == shape.hidden:
        return []
    positions = []
    for units in kept:
        extra = min(set(range(shape.hidden)) - set(units))
        units.append(extra)
        units.sort()
        positions.append(units.index(extra))
    return positions


def _silence(parameters: dict[str, nn.Parameter], shape: RecurrentShape, hidden: int, positions: Sequence[int]) -> None:
    """Zero the gate rows (and the projection column) of one unit per block, at ``positions``, in place."""
    with torch.no_grad():
        for block, position in enumerate(positions):
            number, direction = divmod(block, shape.directions)
            rows = [gate * hidden + position for gate in range(shape.gates)]
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                name = parameter_name(kind, number, direction)
                if name in parameters:
                    parameters[name][rows] = 0
            parameters[parameter_name("weight_hr", number, direction)][:, position] = 0


class RecurrentPruner:
    """The surgery of ``nn.LSTM``/``nn.GRU``/``nn.RNN``: input columns and hidden units (see the module's docstring).

    Its inputs are the input features followed by the hidden units (:meth:`get_in_channels`); its outputs are the
    rows of every gate of every layer and direction, the entries of the ``bias_ih`` biases (what bias compensation
    adds to). Outputs are never removed by themselves: a unit's rows go with the unit.
    """

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Remove input features (``idxs < input_size``) and hidden units (``input_size + n``) in one surgery."""
        module: Any = layer
        shape = RecurrentShape.of(module)
        features = [int(i) for i in idxs if int(i) < shape.inputs]
        kept = _kept_units(shape, [int(i) - shape.inputs for i in idxs if int(i) >= shape.inputs])
        kept_features = [f for f in range(shape.inputs) if f not in set(features)]
        if not kept_features:
            raise ValueError("a recurrent layer must keep at least one input feature")
        dead = _placeholder_units(shape, kept)
        hidden = len(kept[0])
        new: dict[str, nn.Parameter] = {}
        for number in range(shape.layers):
            if number == 0:
                columns = kept_features
            elif shape.proj:
                columns = list(range(shape.layer_inputs(number)))
            else:  # the previous layer's units that stay, direction after direction
                below = (number - 1) * shape.directions
                columns = [d * shape.hidden + j for d in range(shape.directions) for j in kept[below + d]]
            for direction in range(shape.directions):
                units = kept[number * shape.directions + direction]
                rows = _gate_rows(shape, units)
                recurrent = range(shape.proj) if shape.proj else units
                name = parameter_name("weight_ih", number, direction)
                new[name] = _selected(module.get_parameter(name), [(0, rows), (1, columns)])
                name = parameter_name("weight_hh", number, direction)
                new[name] = _selected(module.get_parameter(name), [(0, rows), (1, recurrent)])
                if module.bias:
                    for kind in ("bias_ih", "bias_hh"):
                        name = parameter_name(kind, number, direction)
                        new[name] = _selected(module.get_parameter(name), [(0, rows)])
                if shape.proj:
                    name = parameter_name("weight_hr", number, direction)
                    new[name] = _selected(module.get_parameter(name), [(1, units)])
        if dead:
            _silence(new, shape, hidden, dead)
        _set_parameters(module, new)
        module.input_size = len(kept_features)
        module.hidden_size = hidden
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Never: the gate rows of a hidden unit go with the unit (:meth:`prune_in_channels`)."""
        raise NotImplementedError("a recurrent layer loses gate rows only with their hidden units (its inputs)")

    def get_in_channels(self, layer: nn.Module) -> int:
        """``input_size`` plus every hidden unit of every layer and direction."""
        shape = RecurrentShape.of(layer)  # type: ignore[arg-type]
        return shape.inputs + shape.units

    def get_out_channels(self, layer: nn.Module) -> int:
        """The gate rows of every layer and direction: the entries of all the ``bias_ih`` biases together."""
        shape = RecurrentShape.of(layer)  # type: ignore[arg-type]
        return shape.blocks * shape.gates * shape.hidden


RECURRENT_PRUNER = RecurrentPruner()


def parameters_after(module: nn.RNNBase, removed_inputs: Sequence[int]) -> int | None:
    """The parameters ``module`` keeps without the inputs ``removed_inputs`` (features and units); ``None``: invalid."""
    features = sum(1 for i in removed_inputs if i < RecurrentShape.of(module).inputs)
    return parameters_kept(module, features, len(removed_inputs) - features)


def parameters_kept(module: nn.RNNBase, features: int, units: int) -> int | None:
    """The parameters ``module`` keeps without ``features`` input features and ``units`` hidden units (all blocks)."""
    shape = RecurrentShape.of(module)
    if units % shape.blocks:
        return None
    hidden = shape.hidden - units // shape.blocks
    if shape.proj and hidden == shape.proj and units:
        hidden += 1  # a silenced placeholder unit stays (see _placeholder_units)
    outputs = shape.proj or hidden
    total = 0
    for number in range(shape.layers):
        width = shape.inputs - features if number == 0 else shape.directions * outputs
        per_direction = shape.gates * hidden * (width + outputs)
        per_direction += 2 * shape.gates * hidden if module.bias else 0
        per_direction += shape.proj * hidden
        total += shape.directions * per_direction
    return total


def _effective_recurrent(module: nn.RNNBase, number: int, direction: int) -> Tensor:
    """``weight_hh``, or with a projection ``weight_hh @ weight_hr``: how the gates read the cell units' last step."""
    weight: Tensor = module.get_parameter(parameter_name("weight_hh", number, direction))
    if module.proj_size:
        weight = weight @ module.get_parameter(parameter_name("weight_hr", number, direction))
    return weight


def _next_layer_columns(module: nn.RNNBase, shape: RecurrentShape, number: int, direction: int, reading: int) -> Tensor:
    """How the next layer's ``reading`` direction reads the units of (``number``, ``direction``): (rows, hidden)."""
    weight = module.get_parameter(parameter_name("weight_ih", number + 1, reading))
    columns = weight[:, direction * shape.outputs : (direction + 1) * shape.outputs]
    if shape.proj:
        columns = columns @ module.get_parameter(parameter_name("weight_hr", number, direction))
    return columns


def input_columns(module: nn.RNNBase) -> Tensor:
    """What one unit of constant input adds to each gate row, ``(inputs, rows)``: for bias compensation.

    Rows are :meth:`RecurrentPruner.get_out_channels`' (layer by layer, direction by direction, gate by gate). An
    input feature reaches the first layer's rows; a hidden unit reaches its own block's rows through ``weight_hh``
    and the next layer's through its ``weight_ih`` (through ``weight_hr`` with a projection).
    """
    shape = RecurrentShape.of(module)
    block_rows = shape.gates * shape.hidden
    reference = module.get_parameter(parameter_name("weight_ih", 0, 0))
    columns = torch.zeros(shape.inputs + shape.units, shape.blocks * block_rows, dtype=reference.dtype)
    columns = columns.to(reference.device)
    with torch.no_grad():
        for direction in range(shape.directions):
            rows = slice(direction * block_rows, (direction + 1) * block_rows)
            columns[: shape.inputs, rows] = module.get_parameter(parameter_name("weight_ih", 0, direction)).t()
        for number in range(shape.layers):
            for direction in range(shape.directions):
                block = number * shape.directions + direction
                units = slice(shape.inputs + block * shape.hidden, shape.inputs + (block + 1) * shape.hidden)
                own = slice(block * block_rows, (block + 1) * block_rows)
                columns[units, own] += _effective_recurrent(module, number, direction).t()
                if number + 1 < shape.layers:
                    for reading in range(shape.directions):
                        target = (number + 1) * shape.directions + reading
                        rows = slice(target * block_rows, (target + 1) * block_rows)
                        columns[units, rows] += _next_layer_columns(module, shape, number, direction, reading).t()
    return columns.detach()


def squared_column_norms(module: nn.RNNBase) -> Tensor:
    """``‖column‖²`` of every input of :func:`input_columns`.

    With a projection, the last layer's units add their ``weight_hr`` column: the way they reach the outputs.
    """
    norms = input_columns(module).square().sum(1)
    shape = RecurrentShape.of(module)
    if shape.proj:
        number = shape.layers - 1
        with torch.no_grad():
            for direction in range(shape.directions):
                block = number * shape.directions + direction
                start = shape.inputs + block * shape.hidden
                weight = module.get_parameter(parameter_name("weight_hr", number, direction))
                norms[start : start + shape.hidden] += weight.square().sum(0)
    return norms


def add_to_bias(module: nn.RNNBase, delta: Tensor) -> None:
    """Add ``delta`` (one value per gate row, :func:`input_columns`' rows) to the ``bias_ih`` of every block."""
    if not module.bias:
        raise ValueError(
            f"bias compensation needs the biases of {type(module).__name__} (built with bias=False): use"
            " `compensate: false`"
        )
    shape = RecurrentShape.of(module)
    block_rows = shape.gates * shape.hidden
    new: dict[str, nn.Parameter] = {}
    for number in range(shape.layers):
        for direction in range(shape.directions):
            block = number * shape.directions + direction
            name = parameter_name("bias_ih", number, direction)
            old = module.get_parameter(name)
            values = delta[block * block_rows : (block + 1) * block_rows].to(old)
            new[name] = nn.Parameter(old.detach() + values, requires_grad=old.requires_grad)
    _set_parameters(module, new)


def zero_hidden_units(module: nn.RNNBase, units: Sequence[int]) -> None:
    """Zero the rows of every gate of the hidden ``units`` (new parameters): their hidden states then stay 0."""
    shape = RecurrentShape.of(module)
    by_block: dict[int, list[int]] = {}
    for n in units:
        by_block.setdefault(int(n) // shape.hidden, []).append(int(n) % shape.hidden)
    new: dict[str, nn.Parameter] = {}
    kinds = ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if module.bias else ()))
    for block, positions in by_block.items():
        number, direction = divmod(block, shape.directions)
        rows = torch.tensor(_gate_rows(shape, positions), dtype=torch.long)
        for kind in kinds:
            name = parameter_name(kind, number, direction)
            old = module.get_parameter(name)
            values = old.detach().clone()
            values[rows.to(values.device)] = 0
            new[name] = nn.Parameter(values, requires_grad=old.requires_grad)
    _set_parameters(module, new)


def hidden_units_layer(
    module: str,
    shape: RecurrentShape,
    readers: Sequence[ModuleSlice] = (),
    name: str = "",
    producers: Sequence[str] = (),
) -> PrunableLayer:
    """The hidden units of the recurrent ``module`` (its name) as a :class:`PrunableLayer` with ``groups`` blocks.

    ``readers`` are the other slices of the group of the module's outputs, numbered by output feature (the last
    layer's units, direction after direction; no projection); they are renumbered to the units. The module itself
    reads every unit (its ``input_size + n`` inputs), where the units are measured. ``name`` and ``producers``
    default to the module's.
    """
    last = (shape.layers - 1) * shape.directions

    def unit(feature: int) -> int:
        return (last + feature // shape.hidden) * shape.hidden + feature % shape.hidden

    units = range(shape.units)
    own = ModuleSlice(module, "in", tuple(shape.inputs + n for n in units), tuple(units))
    renumbered = [piece._replace(neurons=tuple(unit(f) for f in piece.neurons)) for piece in readers]
    return PrunableLayer(
        name=name or module,
        neurons=shape.units,
        producers=tuple(producers) or (module,),
        slices=(own, *renumbered),
        groups=shape.blocks,
    )


def _template(module: nn.RNNBase, number: int) -> nn.RNNBase:
    """A one-layer module of the same kind, without a projection, on the meta device: the shape of one layer."""
    shape = RecurrentShape.of(module)
    options = {
        "input_size": shape.layer_inputs(number),
        "hidden_size": shape.hidden,
        "num_layers": 1,
        "bias": bool(module.bias),
        "batch_first": bool(module.batch_first),
        "bidirectional": shape.directions == 2,
        "device": "meta",
    }
    if module.mode == "LSTM":
        return nn.LSTM(**options)
    if module.mode == "GRU":
        return nn.GRU(**options)
    return nn.RNN(nonlinearity="relu" if module.mode == "RNN_RELU" else "tanh", **options)


def _layer_parameters(module: nn.RNNBase, number: int) -> dict[str, Tensor]:
    shape = RecurrentShape.of(module)
    parameters = {}
    for direction in range(shape.directions):
        kinds = ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if module.bias else ()))
        for kind in kinds:
            value = (
                _effective_recurrent(module, number, direction)
                if kind == "weight_hh"
                else module.get_parameter(parameter_name(kind, number, direction))
            )
            parameters[parameter_name(kind, 0, direction)] = value
    return parameters


def _data(sequence: Tensor | PackedSequence) -> Tensor:
    return sequence.data if isinstance(sequence, PackedSequence) else sequence


def _initial_state(module: nn.RNNBase, hx: Any, number: int) -> Any:
    """Layer ``number``'s share of the initial state the module was given (``None``: zeros)."""
    if hx is None or module.proj_size:  # a projected initial state has no cell-unit form: zeros are measured
        return None
    directions = 2 if module.bidirectional else 1

    def part(state: Tensor) -> Tensor:
        return state[number * directions : (number + 1) * directions]

    return tuple(part(state) for state in hx) if isinstance(hx, tuple) else part(hx)


def _projected(module: nn.RNNBase, number: int, cells: Tensor | PackedSequence) -> Tensor | PackedSequence:
    """The layer's real output from its cell units: each direction's ``weight_hr`` applied to its units."""
    shape = RecurrentShape.of(module)
    data = _data(cells)
    parts = data.split(shape.hidden, dim=-1)
    weights = [module.get_parameter(parameter_name("weight_hr", number, d)) for d in range(shape.directions)]
    output = torch.cat([part @ weight.t() for part, weight in zip(parts, weights, strict=True)], dim=-1)
    if isinstance(cells, PackedSequence):
        return PackedSequence(output, cells.batch_sizes, cells.sorted_indices, cells.unsorted_indices)
    return output


def hidden_states(module: nn.RNNBase, inputs: Tensor | PackedSequence, hx: Any, output: Any) -> Tensor:
    """Every hidden unit's state at every time step, ``(steps, units)`` (:class:`RecurrentShape` numbering).

    One layer without a projection: its output is that already. Otherwise each layer is run again alone (the
    module's parameters, a one-layer module of the same kind: the native kernels), as a plain LSTM on the cell
    units with ``weight_hh @ weight_hr`` when there is a projection; each layer's real output feeds the next.
    """
    shape = RecurrentShape.of(module)
    if shape.layers == 1 and not shape.proj:
        return _data(output[0]).reshape(-1, shape.units)
    states = []
    sequence: Tensor | PackedSequence = inputs
    with torch.no_grad():
        for number in range(shape.layers):
            template = _template(module, number)
            cells, _ = torch.func.functional_call(
                template, _layer_parameters(module, number), (sequence, _initial_state(module, hx, number))
            )
            states.append(_data(cells).reshape(-1, shape.directions * shape.hidden))
            sequence = _projected(module, number, cells) if shape.proj else cells
    return torch.cat(states, dim=-1)


def recurrent_features(module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Tensor:
    """What a recurrent layer reads at each time step, ``(steps, input_size + units)``: its input, then its units."""
    inputs = args[0]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    shape = RecurrentShape.of(module)
    features = _data(inputs).detach().reshape(-1, shape.inputs)
    states = hidden_states(module, inputs, hx, output).detach()
    return torch.cat([features.to(states.dtype), states], dim=-1)


def zero_input_features(inputs: Any, features: Tensor) -> Any:
    """``inputs`` (a tensor or a ``PackedSequence``) with the given features zeroed: the oracle of its producer."""
    data = _data(inputs).clone()
    data[..., features.to(data.device)] = 0
    if isinstance(inputs, PackedSequence):
        return PackedSequence(data, inputs.batch_sizes, inputs.sorted_indices, inputs.unsorted_indices)
    return data
