"""The sweep, its records and its report (see :mod:`benchmarks.residual`)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import DEFAULT_CACHE, DEFAULT_MARKDOWN, command_line, machine_info
from benchmarks.common.machine import Machine
from benchmarks.common.markdown import markdown_table, write_section
from benchmarks.common.records import JsonRecord
from lightning_actprune._plan import plan_from_kept
from lightning_actprune.core import PrunableLayer, PruningPlan, apply_plan, count_parameters, find_prunable_layers

MODELS = (
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "vit_small_patch16_224",
    "vit_medium_patch16_reg4_gap_256",
    "flexivit_small",
    "cait_xxs24_224",
    "eva02_tiny_patch14_224",
    "beit_base_patch16_224",
    "vit_relpos_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "twins_svt_small",
    "pvt_v2_b0",
    "crossvit_tiny_240",
    "xcit_nano_12_p16_224",
    "coat_lite_tiny",
    "mixer_s16_224",
    "resmlp_12_224",
    "levit_128s",
)
"""timm's transformer families (and two MLP-mixers), small variants."""

MARKERS = ("<!-- residual-sweep:begin -->", "<!-- residual-sweep:end -->")
REMOVED_FRACTION = 4
"""Every this-many-th residual channel is removed (a quarter)."""


@dataclasses.dataclass
class ResidualRow(JsonRecord):
    """One model: its residual layer's width and what removing a quarter of it does, or why there is none.

    Attributes:
        model: timm's name.
        params: parameters of the unpruned model.
        width: the residual layer's channels (0: none found).
        removed_params: the fraction of the parameters a quarter of the residual channels removes.
        max_difference: the largest difference from the zeroed model, over the outputs.
        reason: why there is no residual layer (the analysis's warning), or an error.
        seconds: the analysis, the surgery and the two forwards.
    """

    model: str
    params: int
    width: int = 0
    removed_params: float = 0.0
    max_difference: float = 0.0
    reason: str = ""
    seconds: float = 0.0


@dataclasses.dataclass
class ResidualResults(JsonRecord):
    """A whole sweep."""

    rows: list[ResidualRow]
    machine: Machine
    command: str
    minutes: float


def residual_layer(model: nn.Module, layers: Sequence[PrunableLayer]) -> PrunableLayer | None:
    """The layer whose slices include a normalisation that loses channels with it (the residual stream)."""
    for layer in layers:
        for piece in layer.slices:
            module = model.get_submodule(piece.module)
            if piece.module not in layer.producers and isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                return layer
    return None


def zeroed(model: nn.Module, plan: PruningPlan) -> list[Any]:
    """Hooks that zero the removed channels where the norms and the Linear/Conv layers read them (the oracle)."""
    handles = []
    for operation in plan.operations:
        module = model.get_submodule(operation.module)
        norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        if not (norm or (operation.dim == "in" and isinstance(module, (nn.Linear, nn.Conv2d)))):
            continue
        index = torch.tensor(operation.indices)
        last = norm or isinstance(module, nn.Linear)

        def zero(_: nn.Module, args: tuple[Any, ...], index: torch.Tensor = index, last: bool = last) -> Any:
            inputs = args[0].clone()
            inputs.index_fill_(-1 if last else 1, index, 0)
            return (inputs, *args[1:])

        handles.append(module.register_forward_pre_hook(zero))
    return handles


def measure(name: str, batch: int = 4, **options: Any) -> ResidualRow:
    """One model's row; ``options`` go to ``timm.create_model`` (a smaller ``img_size`` in tests)."""
    import timm  # optional: only this benchmark and the ViT ones need it

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **options).eval()
    size = options.get("img_size")
    shape = (3, size, size) if size else tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(batch, *shape)
    row = ResidualRow(name, count_parameters(model))
    started = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = find_prunable_layers(model, x, prune_residual=True)
        layer = residual_layer(model, layers)
        if layer is None:
            row.reason = _first_reason(caught)
            return row
        kept = [i for i in range(layer.neurons) if i % REMOVED_FRACTION]
        plan = plan_from_kept([layer], {layer.name: kept})
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        handles = zeroed(model, plan)
        with torch.no_grad():
            difference = (pruned(x) - model(x)).abs().max()
        for handle in handles:
            handle.remove()
        row.width = layer.neurons
        row.removed_params = 1 - count_parameters(pruned) / row.params
        row.max_difference = float(difference)
    except Exception as error:  # one model's failure is a row of the table, not the end of the sweep
        row.reason = f"error: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
    finally:
        row.seconds = time.perf_counter() - started
    return row


def _first_reason(caught: Sequence[warnings.WarningMessage]) -> str:
    """The warning about the stream (the embedding's group), shortened to its reason."""
    messages = [str(w.message) for w in caught]
    about = [m for m in messages if "heads of" not in m] or messages or ["no residual layer and no warning"]
    text = about[0]
    reason = text.split(": ", 2)[-1] if text.startswith("lightning_actprune: not pruning") else text
    return " ".join(reason.split())[:180]


def render(results: ResidualResults) -> str:
    """The generated section."""
    machine = results.machine
    found = [row for row in results.rows if row.width]
    table = [
        [
            row.model,
            f"{row.params / 1e6:.1f}M",
            row.width or "—",
            f"{100 * row.removed_params:.1f}%" if row.width else "—",
            f"{row.max_difference:.1e}" if row.width else "—",
            row.reason or "",
        ]
        for row in results.rows
    ]
    exact = sum(1 for row in found if row.max_difference < 1e-4)
    return "\n".join(
        [
            "### Residual channels across timm's transformers (generated)",
            "",
            f"Command: `{results.command}` ({results.minutes:.1f} min). Machine: {machine.cpu},"
            f" torch {machine.versions.get('torch')}, timm {machine.versions.get('timm')}.",
            "",
            f"A residual layer in {len(found)} of {len(results.rows)} models; removing every fourth of its channels"
            f" equals zeroing them (largest difference below 1e-4) in {exact} of those {len(found)}.",
            "",
            markdown_table(
                ["model", "params", "residual width", "params removed by ¼ of it", "max |Δ| vs zeroed", "why none"],
                table,
                align="lrrrrl",
            ),
        ]
    )


DEFAULT_JSON = DEFAULT_CACHE / "residual.json"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.residual``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.residual", description=__doc__)
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="timm model names (default: the list)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for name in args.models:
        rows.append(measure(name))
        print(rows[-1])
    results = ResidualResults(
        rows,
        machine_info(("torch", "timm", "torch-pruning")),
        command_line("benchmarks.residual", argv),
        (time.perf_counter() - started) / 60,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(results.to_json())
    text = render(results)
    print(text)
    write_section(args.markdown, text, *MARKERS)
