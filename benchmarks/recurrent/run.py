"""The recurrent benchmark: an LSTM and a GRU classifier of digits read row by row, pruned by −30% in one ``fit``.

Data: scikit-learn's digits (shipped with it), each 8×8 image read as 8 time steps of 8 features (its rows),
standardised; a fixed 80/20 split (1,437 train / 360 validation). Model: ``Linear(8, 64)`` → ReLU → LSTM or GRU
(128 units) → its last step → ``Linear(128, 10)``. Each seed trains ``--epochs`` epochs (Adam, batch 64), then
``ActivationPruning(target_params_reduction=0.3, recovery_epochs=1)`` prunes it (the Linear feeding the recurrent
layer loses neurons and the recurrent layer its input columns and hidden units) and trains it one more epoch in the
same ``fit``. Writes ``benchmarks/.cache/recurrent.json`` and BENCHMARKS.md's ``recurrent`` section.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import DEFAULT_CACHE, DEFAULT_MARKDOWN, command_line, machine_info, quiet_trainer, write_section
from lightning_actprune import ActivationPruning
from lightning_actprune.core import apply_plan, count_parameters, find_prunable_layers, plan_from_kept

RESULTS_FILE = "recurrent.json"
BEGIN, END = "<!-- recurrent:begin -->", "<!-- recurrent:end -->"
HEADING = "### LSTM and GRU classifiers on digits read row by row (generated)"
KINDS: dict[str, type[nn.RNNBase]] = {"LSTM": nn.LSTM, "GRU": nn.GRU}
TARGET = 0.3


def digit_rows(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as sequences of their 8 rows (8 features each), standardised; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


class RowReader(nn.Module):
    """``Linear(8, 64)`` → ReLU → a recurrent layer of ``hidden`` units → its last step → ``Linear(hidden, 10)``."""

    def __init__(self, kind: type[nn.RNNBase], hidden: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 64)
        self.rnn = kind(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, rows: Tensor) -> Tensor:
        steps, _ = self.rnn(F.relu(self.proj(rows)))
        return self.head(steps[:, -1])


class Classifier(pl.LightningModule):
    """Cross-entropy, Adam, ``val_acc``."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        logits = self(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@dataclasses.dataclass
class Run:
    """One kind and seed: sizes, the widths the prune left, and validation accuracy at each step."""

    kind: str
    seed: int
    params: int
    prunable_fraction: float
    analysis_seconds: float
    params_after: int = 0
    widths: dict[str, str] = dataclasses.field(default_factory=dict)
    acc_before: float = float("nan")
    acc_pruned: float = float("nan")
    acc_recovered: float = float("nan")
    fit_seconds: float = float("nan")


def prunable_fraction(net: nn.Module, example: Tensor) -> tuple[float, float]:
    """The parameter reduction when every prunable layer keeps one neuron per block; the analysis seconds."""
    net = copy.deepcopy(net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        started = time.perf_counter()
        layers = find_prunable_layers(net, example)
        seconds = time.perf_counter() - started
    total = count_parameters(net)
    apply_plan(net, plan_from_kept(layers, {layer.name: [block[0] for block in layer.blocks()] for layer in layers}))
    return 1 - count_parameters(net) / total, seconds


def measure(kind: str, seed: int, epochs: int, lr: float, root: Path) -> Run:
    """Train ``epochs`` + 1 epochs with the callback pruning −30% after ``epochs``."""
    pl.seed_everything(seed, verbose=False)
    net = RowReader(KINDS[kind])
    train, val = digit_rows()
    fraction, seconds = prunable_fraction(net, train.tensors[0][:8])
    run = Run(kind, seed, count_parameters(net), fraction, seconds)
    pruning = ActivationPruning(target_params_reduction=TARGET, recovery_epochs=1, pruned_checkpoint=None)
    trainer = quiet_trainer(max_epochs=epochs + 1, callbacks=[pruning], default_root_dir=root)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    trainer.fit(
        Classifier(net, lr),
        DataLoader(train, batch_size=64, shuffle=True, generator=generator),
        DataLoader(val, batch_size=360),
    )
    run.fit_seconds = time.perf_counter() - started
    result = pruning.result
    if result is None or not result.pruned:
        return run
    run.params_after = result.params_after
    run.widths = {layer.name: f"{layer.neurons}→{len(layer.kept)}" for layer in result.plan.layers}
    run.acc_before = result.metrics_before["val_acc"]
    run.acc_pruned = result.metrics_after["val_acc"]  # no BatchNorm: right after the surgery
    run.acc_recovered = result.metrics_recovered.get("val_acc", float("nan"))
    return run


def _mean_spread(values: Sequence[float], scale: float = 100.0) -> str:
    """``mean ± standard deviation`` (population, over the seeds), scaled (accuracies in %)."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.pstdev(values):.1f}"


def render_markdown(runs: Sequence[Run], header: dict[str, object]) -> str:
    """One row per kind (mean ± std over the seeds), then each run's widths."""
    lines = [
        f"_Generated by `{header['command']}` in {header['minutes']:.1f} min. Machine: {header['machine']}._",
        "",
        f"scikit-learn's digits read row by row (8 steps × 8 features; 1,437 train / 360 validation); `Linear(8, 64)` →"
        f" ReLU → LSTM/GRU (128) → last step → `Linear(128, 10)`; {header['epochs']} epochs (Adam lr {header['lr']},"
        " batch 64), then `ActivationPruning(target_params_reduction=0.3, recovery_epochs=1)` and one more epoch in"
        f" the same `fit`. Seeds {header['seeds']}: mean ± standard deviation. Accuracies are validation accuracy in"
        " %; *prunable* is the parameter reduction when every prunable layer keeps one unit per block.",
        "",
        "| model | parameters | prunable | after −30% target | before | right after prune | + 1 recovery epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        mine = [run for run in runs if run.kind == kind]
        if not mine:
            continue
        reduction = [1 - run.params_after / run.params for run in mine if run.params_after]
        lines.append(
            f"| {kind} | {mine[0].params:,} | {100 * mine[0].prunable_fraction:.1f}% |"  # the same for every seed
            f" {_mean_spread(reduction)}% | {_mean_spread([r.acc_before for r in mine])} |"
            f" {_mean_spread([r.acc_pruned for r in mine])} | {_mean_spread([r.acc_recovered for r in mine])} |"
        )
    lines += ["", "Widths after the prune (neurons or hidden units before → after):", ""]
    lines += [f"- {run.kind}, seed {run.seed}: {', '.join(f'{k} {v}' for k, v in run.widths.items())}" for run in runs]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run every kind and seed; write the JSON and print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recurrent", description=__doc__)
    parser.add_argument("--epochs", type=int, default=15, help="epochs before the prune (one recovery epoch follows)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN, help="the file whose section is written")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be an integer >= 1; got {args.epochs}")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs = []
    for kind in args.kinds:
        for seed in args.seeds:
            run = measure(kind, seed, args.epochs, args.lr, args.cache_dir / "recurrent")
            print(f"[{time.perf_counter() - started:6.1f}s] {kind} seed {seed}: {run.widths}", flush=True)
            runs.append(run)
    header = {
        "command": command_line("benchmarks.recurrent", argv),
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine_info().describe(),
        "epochs": args.epochs,
        "lr": args.lr,
        "seeds": ", ".join(map(str, args.seeds)),
    }
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path = args.cache_dir / RESULTS_FILE
    path.write_text(json.dumps({"header": header, "runs": [dataclasses.asdict(r) for r in runs]}, indent=1))
    table = render_markdown(runs, header)
    write_section(args.markdown, f"{HEADING}\n\n{table}", BEGIN, END)
    print(table)
    print(f"wrote {path} and {args.markdown}")
