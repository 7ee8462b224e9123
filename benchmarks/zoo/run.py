"""The per-architecture benchmark: models, data, one measured ``fit`` each, the report (the command line)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import logging
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import DEFAULT_CACHE, DEFAULT_MARKDOWN, command_line, machine_info, quiet_trainer, write_section
from lightning_actprune import ActivationPruning
from lightning_actprune.core import apply_plan, count_parameters, find_prunable_layers, plan_from_kept

BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
RESULTS_FILE = "zoo_results.json"
VOCAB, SEQ_LEN, TOKEN_CLASSES = 32, 16, 4
COST_SAMPLES = 2_000


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One model of the table: its library, how to build it, and which data it trains on."""

    name: str
    library: str  # the module that must be importable
    task: str  # "digits" (10 classes, 3×size×size), "tokens" (4 classes, a token sequence) or "lm" (next token)
    build: Callable[[], nn.Module]
    size: int = 32  # the digits' side for vision models
    epochs: int | None = None  # this model's epochs before the prune, if not the run's
    lr: float | None = None  # this model's learning rate, if not the run's


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=10)

    return build


def _convnext_atto() -> nn.Module:
    import timm

    return timm.create_model("convnext_atto", pretrained=False, num_classes=10)


def _vit_tiny() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    # ViT-Tiny's width, depth and heads (192, 12, 3) on 32×32 images in 4×4 patches
    return VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=12, num_heads=3)


class _HFLogits(nn.Module):
    """A Hugging Face model whose forward returns its logits tensor (a LightningModule-friendly output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens).logits


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=SEQ_LEN,
        num_labels=TOKEN_CLASSES,
    )
    return _HFLogits(BertForSequenceClassification(config))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=128, n_layer=4, n_head=4)  # use_cache on
    return _HFLogits(GPT2LMHeadModel(config))


class _Recurrent(nn.Module):
    """Embedding → Linear → ReLU → LSTM/GRU → (last step) Linear → ReLU → Linear."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.proj = nn.Linear(64, 128)
        self.rnn = kind(128, 128, batch_first=True)
        self.hidden = nn.Linear(128, 128)
        self.head = nn.Linear(128, TOKEN_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(F.relu(self.proj(self.embed(tokens))))
        return self.head(F.relu(self.hidden(out[:, -1])))


ARCHITECTURES = (
    Architecture("torchvision resnet18", "torchvision", "digits", _torchvision("resnet18")),
    # at 32×32 its last feature maps are 1×1 and its BatchNorm running statistics never fit eval mode: 64×64
    Architecture(
        "torchvision mobilenet_v3_small (64×64)", "torchvision", "digits", _torchvision("mobilenet_v3_small"), 64
    ),
    Architecture("timm convnext_atto", "timm", "digits", _convnext_atto),
    # a ViT learns 1,437 images slowly: 8 epochs at 5e-4 (76% before the prune in a trial run), not 3 (chance)
    Architecture("timm ViT-Tiny (32×32, patch 4)", "timm", "digits", _vit_tiny, epochs=8, lr=5e-4),
    Architecture("HF BERT (4 layers, 128 wide)", "transformers", "tokens", _bert),
    Architecture("HF GPT-2 (4 layers, 128 wide)", "transformers", "lm", _gpt2),
    Architecture("LSTM classifier", "torch", "tokens", lambda: _Recurrent(nn.LSTM)),
    Architecture("GRU classifier", "torch", "tokens", lambda: _Recurrent(nn.GRU)),
)


def digits_data(size: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits (shipped with it), upscaled to 3×size×size and standardised; 80/20 split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return TensorDataset(x[order[:cut]], y[order[:cut]]), TensorDataset(x[order[cut:]], y[order[cut:]])


def token_data(task: str, samples: int = 4_000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Synthetic sequences that need attention across positions.

    ``tokens``: the label is which quarter of the vocabulary the first token falls in, counted among the others
    (the most frequent quarter of positions 1…, ties to the first token's quarter). ``lm``: arithmetic sequences
    ``x[t+1] = x[t] + k (mod VOCAB)`` with a step ``k`` in 1…4 per sequence, learned from the context.
    """
    generator = torch.Generator().manual_seed(seed)
    if task == "lm":
        start = torch.randint(0, VOCAB, (samples, 1), generator=generator)
        step = torch.randint(1, 5, (samples, 1), generator=generator)
        x = (start + step * torch.arange(SEQ_LEN)) % VOCAB
        y = x.roll(-1, dims=1)
    else:
        x = torch.randint(0, VOCAB, (samples, SEQ_LEN), generator=generator)
        quarters = torch.nn.functional.one_hot(x[:, 1:] * TOKEN_CLASSES // VOCAB, TOKEN_CLASSES).sum(1)
        y = quarters.argmax(-1)
    cut = int(0.8 * samples)
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


class Model(pl.LightningModule):
    """Any network: cross-entropy, Adam, ``val_acc`` (for ``lm``: next-token accuracy on positions 1…)."""

    def __init__(self, net: nn.Module, task: str, lr: float) -> None:
        super().__init__()
        self.net, self.task, self.lr = net, task, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss_and_hits(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        if self.task == "lm":  # position 0 has no context to infer the step from
            logits, y = logits[:, 1:-1].reshape(-1, logits.shape[-1]), y[:, 1:-1].reshape(-1)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._loss_and_hits(batch)[0]

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, hits = self._loss_and_hits(batch)
        self.log("val_loss", loss)
        self.log("val_acc", hits.mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@dataclasses.dataclass
class Row:
    """One architecture's numbers (or why it has none)."""

    name: str
    status: str  # "measured", "skipped: …" or "error: …"
    params: int = 0
    prunable_fraction: float = float("nan")
    analysis_seconds: float = float("nan")
    validation_seconds: float = float("nan")
    params_after: int = 0
    acc_before: float = float("nan")
    acc_pruned: float = float("nan")  # right after the surgery (before recalibration)
    acc_after: float = float("nan")  # after recalibration (= acc_pruned without BatchNorm)
    acc_recovered: float = float("nan")
    layers: int = 0
    messages: list[str] = dataclasses.field(default_factory=list)


def _example(task: str, size: int = 32) -> Tensor:
    if task == "digits":
        return torch.randn(8, 3, size, size)
    return torch.randint(0, VOCAB, (8, SEQ_LEN))


def analysis_cost(net: nn.Module, task: str, size: int = 32) -> tuple[float, float, float, list[str]]:
    """Analysis seconds, seconds of one no-grad pass over 2,000 samples, max prunable fraction, skip messages."""
    net = copy.deepcopy(net).eval()
    example = _example(task, size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        layers = find_prunable_layers(net, example)
        analysis = time.perf_counter() - started
    messages = [str(w.message) for w in caught if "lightning_actprune" in str(w.message)]
    batch = example.repeat(8, *([1] * (example.dim() - 1)))  # 64 samples
    with torch.no_grad():
        net(batch)  # warm-up
        started = time.perf_counter()
        for _ in range(COST_SAMPLES // len(batch)):
            net(batch)
        validation = (time.perf_counter() - started) * COST_SAMPLES / (len(batch) * (COST_SAMPLES // len(batch)))
    total = count_parameters(net)
    if layers:
        apply_plan(net, plan_from_kept(layers, {layer.name: (0,) for layer in layers}))
    return analysis, validation, 1 - count_parameters(net) / total, messages


def measure(arch: Architecture, epochs: int, lr: float, root: Path) -> Row:
    """Train ``epochs`` + 1 epochs with the callback pruning −30% after ``epochs``; the costs on the side."""
    if importlib.util.find_spec(arch.library) is None:
        return Row(arch.name, f"skipped: {arch.library} is not installed")
    pl.seed_everything(0, verbose=False)
    net = arch.build()
    row = Row(arch.name, "measured", params=count_parameters(net))
    row.analysis_seconds, row.validation_seconds, row.prunable_fraction, row.messages = analysis_cost(
        net, arch.task, arch.size
    )
    train, val = digits_data(arch.size) if arch.task == "digits" else token_data(arch.task)
    epochs, lr = arch.epochs or epochs, arch.lr or lr
    pruning = ActivationPruning(target_params_reduction=0.3, recovery_epochs=1, pruned_checkpoint=None)
    trainer = quiet_trainer(max_epochs=epochs + 1, callbacks=[pruning], default_root_dir=root)
    generator = torch.Generator().manual_seed(0)
    trainer.fit(
        Model(net, arch.task, lr),
        DataLoader(train, batch_size=64, shuffle=True, generator=generator),
        DataLoader(val, batch_size=256),
    )
    result = pruning.result
    row.layers = len(pruning.prunable_layers or [])
    if result is None or not result.pruned:
        row.status = "nothing pruned"
        return row
    row.params_after = result.params_after
    row.acc_before = result.metrics_before["val_acc"]
    row.acc_after = result.metrics_after["val_acc"]
    row.acc_pruned = result.metrics_pruned.get("val_acc", row.acc_after)
    row.acc_recovered = (result.metrics_recovered or {}).get("val_acc", float("nan"))
    return row


def _pct(value: float) -> str:
    return "—" if value != value else f"{100 * value:.1f}"


def render_markdown(rows: Sequence[Row], header: dict[str, Any]) -> str:
    """The generated section: one row per architecture, then the skip messages."""
    lines = [
        f"_Generated by `{header['command']}` in {header['minutes']:.1f} min. Machine: {header['machine']}._",
        "",
        f"Each model trains {header['epochs']} epochs (AdamW lr {header['lr']}, batch 64, seed 0; ViT-Tiny 8 epochs at"
        " lr 5e-4, which it needs to learn at all), then"
        " `ActivationPruning(target_params_reduction=0.3, recovery_epochs=1)` prunes it and trains it one more epoch"
        " inside the same `fit`. Vision models: scikit-learn's digits upscaled to 3×32×32 (1,437 train / 360"
        " validation); BERT and the recurrent nets: which quarter of the vocabulary is most frequent in a random"
        " 16-token sequence (3,200 / 800); GPT-2: next-token accuracy on arithmetic sequences with a per-sequence step"
        " (3,200 / 800). Accuracies are validation accuracy in %. *prunable* is the parameter reduction when every"
        " prunable group keeps one neuron; *analysis / val pass* is the dependency tracing and per-layer checks"
        f" (`find_prunable_layers`) as a ratio to one no-grad pass over {COST_SAMPLES:,} samples.",
        "",
        "| architecture | parameters | prunable | analysis (s) | analysis / val pass | groups | after −30% target |"
        " before | right after prune | + BN recalibration | + 1 recovery epoch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.status not in ("measured", "nothing pruned"):
            lines.append(f"| {r.name} | {r.status} |||||||||| ")
            continue
        after = f"{r.params_after:,} ({r.params_after / r.params - 1:+.1%})" if r.params_after else r.status
        if not r.params_after and r.prunable_fraction < 0.3:
            after = f"out of reach ({r.prunable_fraction:.1%} prunable)"
        lines.append(
            f"| {r.name} | {r.params:,} | {r.prunable_fraction:.1%} | {r.analysis_seconds:.2f} |"
            f" {r.analysis_seconds / r.validation_seconds:.2f}× | {r.layers} | {after} | {_pct(r.acc_before)} |"
            f" {_pct(r.acc_pruned)} | {_pct(r.acc_after)} | {_pct(r.acc_recovered)} |"
        )
    notes = [(r.name, m) for r in rows for m in r.messages]
    if notes:
        lines += ["", "What the analysis skipped, in its own words:", ""]
        lines += [f"- {name}: {message.removeprefix('lightning_actprune: ')}" for name, message in notes]
    return "\n".join(lines)


def merged_with_earlier(path: Path, rows: list[Row], header: dict[str, Any]) -> list[Row]:
    """``rows`` (a ``--models`` subset) in place of the same architectures' rows of the last run, if it is comparable.

    The last run counts when it trained as many epochs at the same learning rate; its other rows are kept, in the
    order of :data:`ARCHITECTURES`, and the command says both runs.
    """
    if not path.is_file():
        return rows
    earlier = json.loads(path.read_text())
    if (earlier["header"]["epochs"], earlier["header"]["lr"]) != (header["epochs"], header["lr"]):
        return rows
    by_name = {row["name"]: Row(**row) for row in earlier["rows"]}
    by_name.update({row.name: row for row in rows})
    header["command"] = f"{earlier['header']['command']}, then {header['command']}"
    header["minutes"] += earlier["header"]["minutes"]
    order = [a.name for a in ARCHITECTURES]
    return sorted(by_name.values(), key=lambda r: order.index(r.name) if r.name in order else len(order))


def main(argv: Sequence[str] | None = None) -> None:
    """Measure every architecture whose library is installed; write the JSON and BENCHMARKS.md's section."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__)
    parser.add_argument("--epochs", type=int, default=4, help="epochs before the prune (one recovery epoch follows)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--models", nargs="+", default=None, help="substrings of the architectures to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be an integer >= 1; got {args.epochs}")
    chosen = [a for a in ARCHITECTURES if not args.models or any(m.lower() in a.name.lower() for m in args.models)]
    if not chosen:
        names = ", ".join(a.name for a in ARCHITECTURES)
        parser.error(f"--models {' '.join(args.models)} matches none of: {names}")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for arch in chosen:
        try:
            row = measure(arch, args.epochs, args.lr, args.cache_dir / "zoo")
        except Exception as error:  # one architecture's failure is a row of the table, not the end of the run
            traceback.print_exc()
            row = Row(arch.name, f"error: {type(error).__name__}: {' '.join(str(error).split())[:120]}")
        print(f"[{time.perf_counter() - started:7.1f}s] {row.name}: {row.status}", flush=True)
        rows.append(row)
    header = {
        "command": command_line("benchmarks.zoo", argv),
        "minutes": (time.perf_counter() - started) / 60,
        "machine": machine_info().describe(),
        "epochs": args.epochs,
        "lr": args.lr,
    }
    rows = merged_with_earlier(args.cache_dir / RESULTS_FILE, rows, header) if args.models else rows
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    (args.cache_dir / RESULTS_FILE).write_text(
        json.dumps({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1)
    )
    write_section(args.markdown, render_markdown(rows, header), BEGIN, END)
    print(f"wrote {args.markdown} and {args.cache_dir / RESULTS_FILE}")
