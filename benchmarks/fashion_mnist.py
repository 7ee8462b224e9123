"""Benchmark ActivationPruning on Fashion-MNIST against the tools a user would pick instead.

Run from the repository root (CPU only; 2 to 8 minutes on 2 shared cores, training included)::

    python benchmarks/fashion_mnist.py

It trains an MLP 784-1024-1024-10 (ReLU, Adam lr 1e-3, batch 128, 10 epochs, seed 0) once and caches its weights
under ``benchmarks/.cache/`` (git-ignored); every comparison starts from a deep copy of those weights. The last 10k
training images are the validation set (statistics and re-validation); accuracy is measured on the 10k test set.
No method is fine-tuned after pruning. Table 3 tests every setting of our options (statistic × compensate ×
normalize) at each target reduction and names the setting the evidence recommends as the defaults.

It rewrites the generated part of ``BENCHMARKS.md`` (between the ``benchmark:begin``/``benchmark:end`` markers; the
text around them is kept) and ``docs/benchmark_accuracy_vs_params.png``, and stores every number in
``benchmarks/.cache/fashion_mnist_results.json``.

The data come from the Debian package ``dataset-fashion-mnist`` (standard IDX files under
``/usr/share/datasets/fashion-mnist``); when they are missing the script installs the package with ``apt-get``
(as root or through ``sudo``), or stops and says how to get them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import hashlib
import importlib.metadata
import io
import itertools
import json
import logging
import math
import os
import platform
import shutil
import statistics as stats
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torch_pruning as tp
from lightning.pytorch.callbacks import ModelPruning
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_actprune import (
    STATISTICS,
    ActivationMoments,
    ActivationPruning,
    ActivationRecorder,
    PrunableLayer,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    layer_scores,
    model_size_mb,
    plan_from_kept,
    plan_pruning,
    threshold_for_reduction,
)

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEFAULT_CACHE = ROOT / "benchmarks" / ".cache"
DEFAULT_MARKDOWN = ROOT / "BENCHMARKS.md"
DEFAULT_PLOT = ROOT / "docs" / "benchmark_accuracy_vs_params.png"
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"


# --------------------------------------------------------------------------------------------------- data and model


def read_idx(path: Path) -> Tensor:
    """Read one gzipped IDX file of unsigned bytes (the MNIST format) into a ``uint8`` tensor."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), body has {len(body)}.")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _has_idx_files(directory: Path) -> bool:
    return all((directory / name).is_file() for name in IDX_FILES.values())


def locate_fashion_mnist(data_dir: Path | None = None, install: bool = True) -> Path:
    """The directory holding Fashion-MNIST's four IDX files, installing the Debian package if needed.

    Args:
        data_dir: look only here (no install); default: ``$FASHION_MNIST_DIR``, then the Debian package's directory.
        install: when the files are missing, run ``apt-get install -y dataset-fashion-mnist`` (as root or via
            ``sudo``).

    Raises:
        FileNotFoundError: the files are not there and could not be installed; the message says how to get them.
    """
    if data_dir is not None:
        if _has_idx_files(data_dir):
            return data_dir
        raise FileNotFoundError(
            f"{data_dir} does not hold Fashion-MNIST's IDX files ({', '.join(IDX_FILES.values())})."
        )
    candidates = [Path(os.environ["FASHION_MNIST_DIR"])] if os.environ.get("FASHION_MNIST_DIR") else []
    candidates.append(DATA_DIR)
    for directory in candidates:
        if _has_idx_files(directory):
            return directory
    why = "apt-get is not available"
    if install and shutil.which("apt-get"):
        prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if prefix is None:
            why = "not root and no sudo"
        else:
            print(f"Fashion-MNIST not found; installing the Debian package {DEBIAN_PACKAGE} ...", file=sys.stderr)
            update = subprocess.run([*prefix, "apt-get", "update"], capture_output=True, text=True)
            done = subprocess.run([*prefix, "apt-get", "install", "-y", DEBIAN_PACKAGE], capture_output=True, text=True)
            if _has_idx_files(DATA_DIR):
                return DATA_DIR
            why = f"apt-get failed: {(done.stderr or update.stderr).strip()[-300:]}"
    raise FileNotFoundError(
        f"Fashion-MNIST is not installed ({why}). Install it with `apt-get update && apt-get install -y"
        f" {DEBIAN_PACKAGE}` (files under {DATA_DIR}), or pass `--data-dir` / set FASHION_MNIST_DIR to a directory"
        f" with {', '.join(IDX_FILES.values())}."
    )


def load_fashion_mnist(directory: Path, num_val: int = 10_000) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train, validation (the last ``num_val`` training images) and test sets; pixels flattened, scaled to [0, 1]."""
    tensors = {key: read_idx(directory / name) for key, name in IDX_FILES.items()}
    x_train = tensors["train_images"].flatten(1).float() / 255.0
    x_test = tensors["test_images"].flatten(1).float() / 255.0
    y_train, y_test = tensors["train_labels"].long(), tensors["test_labels"].long()
    cut = len(x_train) - num_val
    return (
        TensorDataset(x_train[:cut], y_train[:cut]),
        TensorDataset(x_train[cut:], y_train[cut:]),
        TensorDataset(x_test, y_test),
    )


class SplitDataModule(pl.LightningDataModule):
    """Fixed train/validation/test tensors; the training order is shuffled with a seeded generator."""

    def __init__(
        self,
        train: TensorDataset,
        val: TensorDataset,
        test: TensorDataset,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set, self.test_set = train, val, test
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)


class MLPClassifier(pl.LightningModule):
    """A ReLU MLP (``sizes`` = input, hidden…, classes) trained with Adam; logs ``val_acc`` and ``test_acc``."""

    def __init__(self, sizes: Sequence[int] = (784, 1024, 1024, 10), lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        for width_in, width_out in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))
        self.lr = lr
        self.val_acc = MulticlassAccuracy(num_classes=sizes[-1], average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=sizes[-1], average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer that writes nothing: no logger, checkpoint, progress bar or model summary."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**options, **kwargs})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the cached weights depend on."""

    sizes: tuple[int, ...] = (784, 1024, 1024, 10)
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0
    num_val: int = 10_000

    def key(self) -> str:
        """A short hash of the configuration, for the cache file name."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def train_or_load(
    datamodule: SplitDataModule, config: TrainConfig, cache_dir: Path, retrain: bool = False
) -> tuple[MLPClassifier, dict[str, Any]]:
    """Train once with Lightning (fixed seeds) and cache the ``state_dict``; later runs load it.

    Returns:
        The trained model (eval mode) and facts about the training run (time, whether it came from the cache).
    """
    weights = cache_dir / f"mlp_{config.key()}.pt"
    facts_path = weights.with_suffix(".json")
    model = MLPClassifier(config.sizes, config.lr)
    if weights.is_file() and facts_path.is_file() and not retrain:
        model.load_state_dict(torch.load(weights, weights_only=True))
        facts = json.loads(facts_path.read_text())
        facts["cached"] = True
        return model.eval(), facts
    pl.seed_everything(config.seed, workers=True, verbose=False)
    model = MLPClassifier(config.sizes, config.lr)
    trainer = quiet_trainer(max_epochs=config.epochs)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    facts = {
        "train_seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "config": dataclasses.asdict(config),
        "final_val_acc": float(trainer.callback_metrics["val_acc"]),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    facts_path.write_text(json.dumps(facts, indent=2))
    facts["cached"] = False
    return model.eval(), facts


# ------------------------------------------------------------------------------------------- measuring and pruning


class Evaluator:
    """Test accuracy and validation passes through one quiet Lightning Trainer."""

    def __init__(self, datamodule: pl.LightningDataModule) -> None:
        self.datamodule = datamodule
        self.trainer = quiet_trainer()
        self.calls = 0

    def test_accuracy(self, model: pl.LightningModule) -> float:
        """Accuracy on the test set."""
        self.calls += 1
        (result,) = self.trainer.test(model, datamodule=self.datamodule, verbose=False)
        return float(result["test_acc"])

    def test_correct(self, model: nn.Module) -> Tensor:
        """Whether each test example is classified correctly (in order); its mean is the test accuracy.

        A plain forward over the test loader, not ``trainer.test``: the paired comparisons of table 3 need the
        examples, not only their mean (which is the same number ``trainer.test`` logs).
        """
        self.calls += 1
        model.eval()
        with torch.inference_mode():
            return torch.cat([model(x).argmax(-1) == y for x, y in self.datamodule.test_dataloader()])

    def validate(self, model: pl.LightningModule) -> dict[str, float]:
        """One plain validation pass; returns the logged metrics."""
        (result,) = self.trainer.validate(model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in result.items()}


def gather_statistics(
    evaluator: Evaluator, model: pl.LightningModule
) -> tuple[list[PrunableLayer], dict[str, ActivationMoments], dict[str, int]]:
    """One validation pass with an :class:`ActivationRecorder` attached: the prunable layers and their moments.

    Returns:
        The layers, the moments by measured module, and the bytes of every layer's metric state.
    """
    with ActivationRecorder(model) as recorder:
        evaluator.validate(model)
    recorder.check_finite()
    layers = find_prunable_layers(model, recorder.example_inputs)
    state_bytes = {
        name: sum(t.numel() * t.element_size() for t in metric.metric_state.values() if isinstance(t, Tensor))
        for name, metric in recorder.metrics.items()
    }
    return layers, recorder.moments(), state_bytes


def pruned_copy(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A deep copy of ``model`` with ``plan`` applied; ``model`` is untouched."""
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan)
    return pruned


def nonzero_parameters(model: nn.Module) -> int:
    """Parameter values that are not exactly zero (what masking-based pruning reduces)."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the file a user would ship."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def widths_of(plan: PruningPlan) -> dict[str, int]:
    """Neurons kept per layer."""
    return {layer.name: len(layer.kept) for layer in plan.layers}


def ours_at_reduction(
    model: nn.Module,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    statistic: str,
    target: float,
    compensate: bool = False,
    normalize: bool = False,
) -> tuple[float, PruningPlan, int]:
    """Our plan that removes at least ``target`` of the parameters, with the first λ that does.

    λ comes from the package's :func:`lightning_actprune.threshold_for_reduction` on a
    :class:`~lightning_actprune.ThresholdEvaluator` with the same options (bisection over the distinct scores,
    pruning and restoring a copy of ``model`` at each step); the plan is then applied to another copy and its
    parameters counted. ``compensate`` folds the removed neurons' mean activations into their consumers' biases (it
    changes no parameter count, so λ is the same as without); ``normalize`` standardises the scores per layer (λ is
    then in standard deviations and may be negative).

    Returns:
        λ, its plan and the pruned model's parameter count.
    """
    evaluator = ThresholdEvaluator(
        copy.deepcopy(model), layers, moments, statistic, min_neurons=1, compensate=compensate, normalize=normalize
    )
    threshold = threshold_for_reduction(evaluator, target)
    plan = plan_pruning(layers, moments, threshold, statistic, model=model, compensate=compensate, normalize=normalize)
    return threshold, plan, count_parameters(pruned_copy(model, plan))


def _top(scores: Tensor, count: int) -> list[int]:
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(int(i) for i in order[:count])


def magnitude_kept(
    model: nn.Module, layers: Sequence[PrunableLayer], widths: Mapping[str, int], example_input: Tensor, norm: int
) -> dict[str, list[int]]:
    """Keep, per layer, the ``widths[layer]`` neurons with the largest Torch-Pruning magnitude importance.

    The importance is ``tp.importance.GroupMagnitudeImportance(p=norm)`` over the neuron's whole coupled group
    (its row of weights in the producing layer and its column in the consuming layer), Torch-Pruning's default
    criterion.
    """
    graph = tp.DependencyGraph()
    with torch.enable_grad():
        graph.build_dependency(model, example_inputs=example_input)
    importance = tp.importance.GroupMagnitudeImportance(p=norm)
    kept: dict[str, list[int]] = {}
    for layer in layers:
        producer_name = layer.producers[0]
        producer = model.get_submodule(producer_name)
        prune_out = tp.prune_linear_out_channels if isinstance(producer, nn.Linear) else tp.prune_conv_out_channels
        channels = producer.weight.shape[0]
        group = graph.get_pruning_group(producer, prune_out, idxs=list(range(channels)))
        channel_scores = importance(group)
        scores = torch.zeros(layer.neurons, dtype=torch.float64)
        (out_slice,) = [s for s in layer.slices if s.module == producer_name and s.dim == "out"]
        for channel, neuron in zip(out_slice.indices, out_slice.neurons, strict=True):
            scores[neuron] = float(channel_scores[channel])
        kept[layer.name] = _top(scores, widths[layer.name])
    return kept


def random_kept(layers: Sequence[PrunableLayer], widths: Mapping[str, int], seed: int) -> dict[str, list[int]]:
    """Keep ``widths[layer]`` neurons per layer, drawn uniformly at random (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        layer.name: sorted(int(i) for i in torch.randperm(layer.neurons, generator=generator)[: widths[layer.name]])
        for layer in layers
    }


def _linear_parameters(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, name) for m in model.modules() if isinstance(m, nn.Linear) for name in ("weight", "bias")]


def lightning_unstructured(model: pl.LightningModule, trainer: pl.Trainer, amount: int) -> pl.LightningModule:
    """A copy pruned by Lightning's ``ModelPruning("l1_unstructured")``: the ``amount`` smallest weights zeroed.

    Global over every ``Linear`` weight and bias, applied once to the trained weights and made permanent (what the
    callback does at the end of training), without the lottery-ticket reset.
    """
    pruned = copy.deepcopy(model)
    pruning = ModelPruning(
        "l1_unstructured",
        parameters_to_prune=_linear_parameters(pruned),
        amount=amount,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
    )
    pruning.setup(trainer, pruned, "fit")
    pruning.apply_pruning(amount)
    pruning.make_pruning_permanent(pruned)
    return pruned


def lightning_structured(
    model: pl.LightningModule,
    trainer: pl.Trainer,
    layers: Sequence[PrunableLayer],
    widths: Mapping[str, int],
    norm: int = 2,
) -> pl.LightningModule:
    """A copy pruned by Lightning's ``ModelPruning("ln_structured")`` on the same layers, to the same widths.

    Per producing layer, the rows (output neurons) of its weight with the smallest L``norm`` norm are zeroed; the
    bias and the next layer's columns stay, as ``ModelPruning`` only masks the named tensor.
    """
    pruned = copy.deepcopy(model)
    for layer in layers:
        for producer in layer.producers:
            module = pruned.get_submodule(producer)
            amount = layer.neurons - widths[layer.name]
            if amount == 0:
                continue
            pruning = ModelPruning(
                "ln_structured",
                parameters_to_prune=[(module, "weight")],
                amount=amount,
                use_global_unstructured=False,
                use_lottery_ticket_hypothesis=False,
                pruning_norm=norm,
                pruning_dim=0,
            )
            pruning.setup(trainer, pruned, "fit")
            pruning.apply_pruning(amount)
            pruning.make_pruning_permanent(pruned)
    return pruned


def measure_latency(
    models: Mapping[str, nn.Module], input_shape: Sequence[int], batch: int, rounds: int, iterations: int
) -> dict[str, float]:
    """Median seconds per forward pass (``inference_mode``) of every model, measured side by side.

    Every model is warmed up, then each round times ``iterations`` forwards of every model in turn (the order
    rotates each round), so drift in the machine's load hits all models alike.
    """
    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            for _ in range(max(3, iterations)):
                model(x)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                model = models[name]
                start = time.perf_counter()
                for _ in range(iterations):
                    model(x)
                times[name].append((time.perf_counter() - start) / iterations)
    return {name: stats.median(values) for name, values in times.items()}


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most CPU memory ``fn`` held allocated through PyTorch at any moment, above what it started with.

    Read from ``torch.profiler`` memory events (each op's own allocations and frees, in time order), so it counts
    the temporaries an op sequence creates even when the allocator reuses memory and the RSS does not move.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    held = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        held += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def measure_cost(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    threshold: float,
    statistic: str,
    repeats: int,
) -> dict[str, Any]:
    """Time the callback's ``on_fit_end`` and the statistics pass against plain validation passes, side by side.

    A Trainer runs ``fit`` for zero epochs on a copy of ``model`` (so its validation data are the fit's, as after a
    real training run); then each round times, in rotating order: ``trainer.validate``; ``trainer.validate`` with an
    :class:`ActivationRecorder` attached; and ``ActivationPruning(threshold).on_fit_end`` on a fresh copy (the
    statistics pass, the dependency analysis, planning, surgery and the re-validation, and whatever else the
    callback does by default, such as writing the pruned checkpoint, into a temporary directory). Ratios are of
    medians.
    """
    with tempfile.TemporaryDirectory() as root_dir:  # whatever the callback writes (its pruned checkpoint) goes here
        return _measure_cost(model, datamodule, threshold, statistic, repeats, root_dir)


def _measure_cost(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    threshold: float,
    statistic: str,
    repeats: int,
    root_dir: str,
) -> dict[str, Any]:
    fitted = copy.deepcopy(model)
    trainer = quiet_trainer(max_epochs=0, default_root_dir=root_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(fitted, datamodule=datamodule)
    fitted.eval()
    recorders: list[ActivationRecorder] = []
    callbacks: list[ActivationPruning] = []
    pruned: list[nn.Module] = []

    def plain() -> None:
        trainer.validate(fitted, datamodule=datamodule, verbose=False)

    def statistics_pass() -> None:
        with ActivationRecorder(fitted) as recorder:
            trainer.validate(fitted, datamodule=datamodule, verbose=False)
        recorder.moments()
        recorders.append(recorder)

    def on_fit_end(fresh: pl.LightningModule) -> None:
        callback = ActivationPruning(threshold=threshold, statistic=statistic, monitor="val_acc")  # type: ignore[arg-type]
        callback.on_fit_end(trainer, fresh)
        callbacks.append(callback)

    def analysis_plan_surgery(fresh: nn.Module) -> None:
        # the steps between the two validation passes, on the statistics of the last statistics pass
        layers = find_prunable_layers(fresh, recorders[-1].example_inputs)
        apply_plan(fresh, plan_pruning(layers, recorders[-1].moments(), threshold, statistic, model=fresh))
        pruned.append(fresh)

    steps: dict[str, Callable[[], None]] = {
        "plain": plain,
        "statistics": statistics_pass,
        "on_fit_end": lambda: on_fit_end(fresh_copies.pop()),
    }
    times: dict[str, list[float]] = {name: [] for name in [*steps, "analysis_plan_surgery"]}
    plain()  # warm-up
    names = list(steps)
    for round_index in range(repeats):
        fresh_copies = [copy.deepcopy(fitted), copy.deepcopy(fitted)]
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        analysis_plan_surgery(fresh_copies.pop())
        times["analysis_plan_surgery"].append(time.perf_counter() - start)

    batch = next(iter(datamodule.val_dataloader()))[0]

    def forward() -> None:
        with torch.inference_mode():
            fitted(batch)

    def recorded_forward() -> None:
        with ActivationRecorder(fitted), torch.inference_mode():
            fitted(batch)

    forward()
    recorded_forward()
    memory = {
        "batch": len(batch),
        "plain": peak_allocated_bytes(forward),
        "statistics": peak_allocated_bytes(recorded_forward),
    }
    median = {name: stats.median(values) for name, values in times.items()}
    result = callbacks[-1].result
    return {
        "repeats": repeats,
        "seconds": times,
        "median_seconds": median,
        "on_fit_end_ratio": median["on_fit_end"] / median["plain"],
        "statistics_ratio": median["statistics"] / median["plain"],
        "statistics_ratio_per_round": [s / p for s, p in zip(times["statistics"], times["plain"], strict=True)],
        "peak_allocated_bytes": memory,
        "params_before": count_parameters(fitted),
        "plain_functions_params_after": count_parameters(pruned[-1]),
        "callback_params_after": None if result is None else result.params_after,
    }


# ------------------------------------------------------------------------------------------------------ the benchmark


class Variant(NamedTuple):
    """One setting of our options: the statistic, bias compensation, per-layer normalisation of the scores."""

    statistic: str
    compensate: bool = False
    normalize: bool = False

    @property
    def label(self) -> str:
        """The options as text: ``"mean"``, ``"mean, compensate"``, ``"std, compensate, normalize"``."""
        return ", ".join([self.statistic] + ["compensate"] * self.compensate + ["normalize"] * self.normalize)

    def distance(self, seed: Variant) -> int:
        """How many of the three settings differ from ``seed``'s: the rule's measure of simplicity."""
        return (
            (self.statistic != seed.statistic)
            + (self.compensate != seed.compensate)
            + (self.normalize != seed.normalize)
        )


def option_grid(statistics: Sequence[str]) -> list[Variant]:
    """Every statistic × compensate × normalize, the seed's settings (no compensation, raw scores) first."""
    return [Variant(s, c, n) for s in statistics for c in (False, True) for n in (False, True)]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the benchmark measures; the defaults are the published run."""

    thresholds: tuple[float, ...] = (0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
    seed_statistic: str = "mean"
    marked_reduction: float = 0.70
    targets: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    plot_targets: tuple[float, ...] = (0.3, 0.6, 0.95)
    statistics: tuple[str, ...] = STATISTICS
    compensated_statistics: tuple[str, ...] = ("mean",)
    random_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    latency_rounds: int = 20
    latency_iterations: dict[int, int] = dataclasses.field(default_factory=lambda: {1: 50, 256: 3})
    speed_rounds: int = 40
    cost_repeats: int = 7
    noise_z: float = 1.96


@dataclasses.dataclass
class MethodRow:
    """One pruned model at one target reduction."""

    target: float
    method: str
    family: str
    params: int
    nonzero: int
    file_bytes: int
    test_acc: float
    test_acc_std: float | None = None
    threshold: float | None = None
    widths: dict[str, int] | None = None
    latency_ms: dict[str, float] | None = None


def _row(
    target: float, method: str, family: str, model: nn.Module, accuracy: float, **extra: Any
) -> tuple[MethodRow, nn.Module]:
    row = MethodRow(
        target=target,
        method=method,
        family=family,
        params=count_parameters(model),
        nonzero=nonzero_parameters(model),
        file_bytes=state_dict_bytes(model),
        test_acc=accuracy,
        **extra,
    )
    return row, model


def compare_at_reduction(
    model: pl.LightningModule,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    evaluator: Evaluator,
    target: float,
    settings: Settings,
    example_input: Tensor,
    extra_variants: Sequence[Variant] = (),
) -> list[tuple[MethodRow, nn.Module]]:
    """Every method at (about) the same parameter reduction, each from a copy of the trained ``model``.

    Ours: λ per statistic (and per ``extra_variants``) by :func:`ours_at_reduction`. The alternatives match
    ``mean``'s result: Lightning's ``l1_unstructured`` zeroes as many parameters as ``mean`` removed;
    ``ln_structured``, Torch-Pruning's magnitude importance (with and without bias compensation) and random
    removal keep ``mean``'s per-layer widths.
    """
    rows: list[tuple[MethodRow, nn.Module]] = []
    before = count_parameters(model)
    reference: PruningPlan | None = None
    reference_params = before
    variants = [Variant(s) for s in settings.statistics] + [Variant(s, True) for s in settings.compensated_statistics]
    variants += [v for v in extra_variants if v not in variants]
    for variant in variants:
        threshold, plan, params = ours_at_reduction(
            model, layers, moments, variant.statistic, target, variant.compensate, variant.normalize
        )
        pruned = pruned_copy(model, plan)
        accuracy = evaluator.test_accuracy(pruned)
        method = f"ours ({variant.label})"
        rows.append(_row(target, method, "ours", pruned, accuracy, threshold=threshold, widths=widths_of(plan)))
        if variant == Variant(settings.seed_statistic) or reference is None:
            reference, reference_params = plan, params
    assert reference is not None
    widths = widths_of(reference)
    trainer = evaluator.trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = lightning_unstructured(model, trainer, before - reference_params)
        rows.append(_row(target, "ModelPruning l1_unstructured", "masked", masked, evaluator.test_accuracy(masked)))
        masked = lightning_structured(model, trainer, layers, widths)
        rows.append(
            _row(
                target,
                "ModelPruning ln_structured (L2 rows)",
                "masked",
                masked,
                evaluator.test_accuracy(masked),
                widths=widths,
            )
        )
    for norm in (1, 2):
        kept = magnitude_kept(model, layers, widths, example_input, norm)
        for compensate in (False, True):
            plan = plan_from_kept(layers, kept, moments=moments, model=model, compensate=compensate)
            pruned = pruned_copy(model, plan)
            rows.append(
                _row(
                    target,
                    f"Torch-Pruning magnitude L{norm}{' + compensate' if compensate else ''}",
                    "magnitude",
                    pruned,
                    evaluator.test_accuracy(pruned),
                    widths=widths,
                )
            )
    accuracies = []
    first: nn.Module | None = None
    for seed in settings.random_seeds:
        pruned = pruned_copy(model, plan_from_kept(layers, random_kept(layers, widths, seed)))
        accuracies.append(evaluator.test_accuracy(pruned))
        if first is None:
            first = pruned
    assert first is not None
    std = stats.stdev(accuracies) if len(accuracies) > 1 else 0.0
    rows.append(
        _row(
            target,
            f"random (mean of {len(accuracies)} seeds)",
            "random",
            first,
            stats.fmean(accuracies),
            test_acc_std=std,
            widths=widths,
        )
    )
    return rows


@dataclasses.dataclass
class GridRow:
    """One setting of our options at one target reduction (table 3)."""

    target: float
    statistic: str
    compensate: bool
    normalize: bool
    threshold: float
    params: int
    widths: dict[str, int]
    test_acc: float


def grid_at_reduction(
    model: nn.Module,
    layers: Sequence[PrunableLayer],
    moments: Mapping[str, ActivationMoments],
    evaluator: Evaluator,
    target: float,
    variants: Sequence[Variant],
) -> list[tuple[GridRow, Tensor]]:
    """Every variant at ``target``: λ from a ``ThresholdEvaluator`` with its options, applied to a copy, tested.

    Returns:
        Per variant, its row and which test examples the pruned model classifies correctly.
    """
    rows: list[tuple[GridRow, Tensor]] = []
    for variant in variants:
        threshold, plan, params = ours_at_reduction(
            model, layers, moments, variant.statistic, target, variant.compensate, variant.normalize
        )
        correct = evaluator.test_correct(pruned_copy(model, plan))
        row = GridRow(target, *variant, threshold, params, widths_of(plan), float(correct.float().mean()))
        rows.append((row, correct))
    return rows


def summarize_grid(rows: Sequence[tuple[GridRow, Tensor]], seed: Variant, z: float = 1.96) -> dict[str, Any]:
    """Each variant's accuracy averaged over the targets, compared with the best and the seed's, and the choice.

    The comparisons are paired on the test examples: for variants ``a`` and ``b``, example ``i`` contributes
    ``d_i`` = (times ``a`` got it right − times ``b`` did) / number of targets, so the difference of the mean
    accuracies is ``mean(d)`` and its standard error ``std(d) / sqrt(n)``. That is the test-set sampling noise
    (the same trained model, the same statistics); it says nothing about another training seed.

    The rule: the variant with the best mean accuracy, unless variants within noise of it (difference at most
    ``z`` standard errors) exist that are closer to ``seed`` (fewer of statistic, compensate, normalize changed);
    then the closest of those, the most accurate among equally close ones.

    Returns:
        Plain data: ``variants`` (per variant: the accuracy per target, the mean, the difference to the best and
        to the seed with their standard errors, ``within_noise``, ``distance`` from the seed, and per target the
        gap to that target's best), ``best``, ``recommended``, ``seed``, ``z``, ``test_examples`` and ``rule``.
    """
    scores: dict[Variant, list[Tensor]] = defaultdict(list)
    accuracy: dict[Variant, dict[str, float]] = defaultdict(dict)
    per_target: dict[str, dict[Variant, Tensor]] = defaultdict(dict)
    for row, correct in rows:
        variant = Variant(row.statistic, row.compensate, row.normalize)
        scores[variant].append(correct.double())
        accuracy[variant][str(row.target)] = row.test_acc
        per_target[str(row.target)][variant] = correct.double()
    per_example = {variant: torch.stack(values).mean(0) for variant, values in scores.items()}
    means = {variant: float(score.mean()) for variant, score in per_example.items()}
    best = max(means, key=lambda v: (means[v], -v.distance(seed)))
    best_at = {t: max(accuracy, key=lambda v: (accuracy[v][t], -v.distance(seed))) for t in per_target}

    def paired(a: Tensor, b: Tensor) -> tuple[float, float]:
        difference = a - b
        return float(difference.mean()), float(difference.std() / math.sqrt(len(difference)))

    summary = []
    for variant in per_example:
        gap, gap_se = paired(per_example[best], per_example[variant])
        gain, gain_se = paired(per_example[variant], per_example[seed]) if seed in per_example else (math.nan, math.nan)
        below_target_best = {
            t: dict(zip(("gap", "se"), paired(correct[best_at[t]], correct[variant]), strict=True))
            | {"best": best_at[t].label}
            for t, correct in per_target.items()
        }
        summary.append(
            {
                **variant._asdict(),
                "label": variant.label,
                "test_acc": accuracy[variant],
                "mean_test_acc": means[variant],
                "below_best": gap,
                "below_best_se": gap_se,
                "within_noise": gap <= z * gap_se,
                "over_seed": gain,
                "over_seed_se": gain_se,
                "distance": variant.distance(seed),
                "below_target_best": below_target_best,
            }
        )
    eligible = [s for s in summary if s["within_noise"]]
    chosen = min(eligible, key=lambda s: (s["distance"], -s["mean_test_acc"]))
    return {
        "variants": summary,
        "best": best.label,
        "recommended": chosen["label"],
        "seed": seed.label,
        "z": z,
        "test_examples": len(next(iter(per_example.values()))),
        "rule": (
            "the best accuracy averaged over the targets, unless a setting closer to the seed's (fewer of statistic,"
            f" compensate, normalize changed) is within {z:g} paired standard errors of it; then the closest such"
            " setting, the most accurate among equally close ones"
        ),
    }


def run_benchmark(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    settings: Settings,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every measurement on the trained ``model`` (never modified) and return plain, JSON-ready results."""
    model.eval()
    evaluator = Evaluator(datamodule)
    started = time.perf_counter()
    before = count_parameters(model)
    base_accuracy = evaluator.test_accuracy(model)
    baseline = {
        "params": before,
        "file_bytes": state_dict_bytes(model),
        "size_mb": model_size_mb(model),
        "test_acc": base_accuracy,
        "val": evaluator.validate(model),
    }
    log(f"unpruned: {before:,} parameters, test accuracy {base_accuracy:.4f}")

    layers, moments, state_bytes = gather_statistics(evaluator, model)
    never_active = {layer.name: int((layer_scores(layer, moments, "nonzero_fraction") == 0).sum()) for layer in layers}
    log(f"neurons that never fire on the validation set: {never_active}")
    example_input = next(iter(datamodule.val_dataloader()))[0][:1]
    input_shape = tuple(example_input.shape[1:])

    seed_rows = []
    seed_models: dict[float, nn.Module] = {}
    for threshold in settings.thresholds:
        plan = plan_pruning(layers, moments, threshold, settings.seed_statistic, model=model)
        pruned = pruned_copy(model, plan)
        params = count_parameters(pruned)
        accuracy = evaluator.test_accuracy(pruned)
        seed_models[threshold] = pruned
        seed_rows.append(
            {
                "threshold": threshold,
                "widths": widths_of(plan),
                "params": params,
                "reduction": 1 - params / before,
                "file_bytes": state_dict_bytes(pruned),
                "test_acc": accuracy,
            }
        )
        log(f"λ={threshold:g}: {params:,} parameters (-{1 - params / before:.1%}), test accuracy {accuracy:.4f}")
    marked = next((r for r in seed_rows if r["reduction"] >= settings.marked_reduction), None)

    grid: list[tuple[GridRow, Tensor]] = []
    for target in settings.targets:
        grid += grid_at_reduction(model, layers, moments, evaluator, target, option_grid(settings.statistics))
        log(f"target -{target:.0%}: {len(settings.statistics) * 4} settings of our options tested")
    seed = Variant(settings.seed_statistic)
    choice = summarize_grid(grid, seed, settings.noise_z)
    recommended = next(
        Variant(v["statistic"], v["compensate"], v["normalize"])
        for v in choice["variants"]
        if v["label"] == choice["recommended"]
    )
    log(f"best mean over the targets: {choice['best']}; recommended: {choice['recommended']}")

    comparison: list[MethodRow] = []
    latency_iterations = settings.latency_iterations
    for target in sorted({*settings.targets, *settings.plot_targets}):
        pairs = compare_at_reduction(
            model, layers, moments, evaluator, target, settings, example_input, extra_variants=[recommended]
        )
        if target in settings.targets:
            models = {"unpruned": model, **{row.method: pruned for row, pruned in pairs}}
            per_batch = {
                batch: measure_latency(models, input_shape, batch, settings.latency_rounds, iterations)
                for batch, iterations in latency_iterations.items()
            }
            for row, _ in pairs:
                row.latency_ms = {str(batch): 1e3 * per_batch[batch][row.method] for batch in per_batch}
            baseline.setdefault("latency_ms_by_target", {})[str(target)] = {
                str(batch): 1e3 * per_batch[batch]["unpruned"] for batch in per_batch
            }
        comparison.extend(row for row, _ in pairs)
        best = max((row for row, _ in pairs), key=lambda r: r.test_acc)
        log(f"target -{target:.0%}: best {best.method} at {best.test_acc:.4f}")

    # table 2 tests with trainer.test, table 3 with a plain forward: the same settings must give the same numbers
    grid_accuracy = {
        (f"ours ({Variant(r.statistic, r.compensate, r.normalize).label})", r.target): r.test_acc for r, _ in grid
    }
    mismatches = [
        f"{row.method} at -{row.target:.0%}: {row.test_acc} vs {grid_accuracy[row.method, row.target]}"
        for row in comparison
        if (row.method, row.target) in grid_accuracy
        and abs(row.test_acc - grid_accuracy[row.method, row.target]) > 1e-6
    ]
    if mismatches:
        log(f"WARNING: tables 2 and 3 disagree: {'; '.join(mismatches)}")

    speed_models: dict[str, nn.Module] = {"unpruned": model}
    speed_params: dict[str, int] = {"unpruned": before}
    for target in settings.targets:
        _, plan, params = ours_at_reduction(model, layers, moments, settings.seed_statistic, target)
        speed_models[f"ours ({settings.seed_statistic}) -{target:.0%}"] = pruned_copy(model, plan)
        speed_params[f"ours ({settings.seed_statistic}) -{target:.0%}"] = params
    if marked is not None:
        name = f"ours ({settings.seed_statistic}) λ={marked['threshold']:g}"
        speed_models[name], speed_params[name] = seed_models[marked["threshold"]], marked["params"]
    masked_rows = [r for r in comparison if r.method == "ModelPruning l1_unstructured" and r.target in settings.targets]
    if masked_rows:
        heaviest = max(masked_rows, key=lambda r: r.target)
        name = f"ModelPruning l1_unstructured -{heaviest.target:.0%}"
        speed_models[name] = lightning_unstructured(model, evaluator.trainer, before - heaviest.nonzero)
        speed_params[name] = heaviest.params
    speed = []
    for batch, iterations in latency_iterations.items():
        latency = measure_latency(speed_models, input_shape, batch, settings.speed_rounds, iterations)
        for name, seconds in latency.items():
            speed.append(
                {
                    "model": name,
                    "batch": batch,
                    "params": speed_params[name],
                    "latency_ms": 1e3 * seconds,
                    "latency_ratio": seconds / latency["unpruned"],
                    "throughput_per_s": batch / seconds,
                    "throughput_ratio": latency["unpruned"] / seconds,
                    "param_ratio": speed_params[name] / before,
                }
            )
    log("speed measured")

    cost_threshold = marked["threshold"] if marked is not None else settings.thresholds[-1]
    cost = measure_cost(model, datamodule, cost_threshold, settings.seed_statistic, settings.cost_repeats)
    cost["threshold"] = cost_threshold
    cost["metric_state_bytes"] = state_bytes
    log(f"cost: on_fit_end {cost['on_fit_end_ratio']:.2f}x, statistics pass {cost['statistics_ratio']:.3f}x")
    return {
        "settings": dataclasses.asdict(settings),
        "baseline": baseline,
        "layers": {layer.name: layer.neurons for layer in layers},
        "never_active": never_active,
        "seed_table": seed_rows,
        "marked": marked,
        "comparison": [dataclasses.asdict(row) for row in comparison],
        "grid": [dataclasses.asdict(row) for row, _ in grid],
        "choice": choice,
        "table_mismatches": mismatches,
        "speed": speed,
        "cost": cost,
        "test_evaluations": evaluator.calls,
        "benchmark_seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, library versions and the torch thread count."""
    model_name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_pruning": importlib.metadata.version("torch-pruning"),  # `tp.__version__` is new in 1.6.1
        "platform": platform.platform(),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _acc(value: float) -> str:
    return f"{100 * value:.2f}"


def _delta(value: float, base: float) -> str:
    return f"{100 * (value - base):+.2f}"


def _mb(size: float) -> str:
    return f"{size / 1e6:.2f}"


def _widths(widths: Mapping[str, int] | None) -> str:
    return "-" if not widths else " / ".join(str(w) for w in widths.values())


def _grid_lines(results: Mapping[str, Any]) -> list[str]:
    """Table 3: every setting of our options at every target, the best per column, and the rule's choice."""
    settings, choice = results["settings"], results["choice"]
    targets = [str(t) for t in settings["targets"]]
    variants = choice["variants"]
    best_per_target = {t: max(v["test_acc"][t] for v in variants) for t in targets}
    best_mean = max(v["mean_test_acc"] for v in variants)
    rank = {v["label"]: i + 1 for i, v in enumerate(sorted(variants, key=lambda v: -v["mean_test_acc"]))}
    z = choice["z"]

    def cell(value: float, best: float) -> str:
        return f"**{_acc(value)}**" if round(100 * value, 2) == round(100 * best, 2) else _acc(value)

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    lines = [
        "### 3. Choosing the defaults: each statistic ± compensation ± normalize, at equal reduction",
        "",
        f"Every setting of `statistic` × `compensate` × `normalize` ({len(variants)} settings) at each target: λ from"
        " `threshold_for_reduction` on a `ThresholdEvaluator` with those options (with `normalize`, λ is in"
        " standard deviations of the layer's scores and may be negative), the plan applied to a deep copy of the"
        " trained model, test accuracy in %. **Bold**: the best of the column. *mean*: the accuracy averaged over"
        f" the {len(targets)} targets. *below best*: how far that mean is below the best setting's, in points, ± one"
        f" paired standard error over the {choice['test_examples']:,} test examples (each example counts the targets"
        " at which one setting got it"
        " right and the other did not; this is the test-set sampling noise of one trained model, not the noise of"
        " another training seed). The Torch-Pruning rows at the bottom are for reference (`mean`'s widths per"
        " target, as in table 2, with and without `plan_from_kept(..., compensate=True)`); they are not options of"
        " the callback.",
        "",
        f"**Rule for the defaults**: {choice['rule']}.",
        "",
        "| rank | statistic | compensate | normalize | "
        + " | ".join(f"−{float(t):.0%}" for t in targets)
        + " | mean | below best (± SE) |",
        "| ---: | :--- | :---: | :---: | " + " | ".join("---:" for _ in targets) + " | ---: | ---: |",
    ]
    for v in variants:
        label = v["label"]
        marks = [
            word for word, name in (("best", choice["best"]), ("recommended", choice["recommended"])) if name == label
        ]
        flag = f" ◀ **{', '.join(marks)}**" if marks else ""
        below = "-" if label == choice["best"] else f"{100 * v['below_best']:.2f} ± {100 * v['below_best_se']:.2f}"
        if not v["within_noise"]:
            below += " *"
        lines.append(
            f"| {rank[label]} | `{v['statistic']}`{flag} | {yes(v['compensate'])} | {yes(v['normalize'])} | "
            + " | ".join(cell(v["test_acc"][t], best_per_target[t]) for t in targets)
            + f" | {cell(v['mean_test_acc'], best_mean)} | {below} |"
        )
    reference: dict[str, dict[str, float]] = defaultdict(dict)
    for row in results["comparison"]:
        if row["family"] == "magnitude" and str(row["target"]) in targets:
            reference[row["method"]][str(row["target"])] = row["test_acc"]
    for method, accuracy in reference.items():
        lines.append(
            f"| - | {method} | {yes(method.endswith('compensate'))} | - | "
            + " | ".join(_acc(accuracy[t]) for t in targets)
            + f" | {_acc(stats.fmean(accuracy[t] for t in targets))} | - |"
        )
    chosen = next(v for v in variants if v["label"] == choice["recommended"])
    best = next(v for v in variants if v["label"] == choice["best"])
    seed = next((v for v in variants if v["label"] == choice["seed"]), None)
    # ties share the better rank
    per_target_rank = [1 + sum(w["test_acc"][t] > chosen["test_acc"][t] for w in variants) for t in targets]
    lines += [
        "",
        f"\\* more than {z:g} standard errors below the best. Unpruned: {_acc(results['baseline']['test_acc'])}%.",
        "",
        f"**Best mean over the targets: `{choice['best']}`**, {_acc(best['mean_test_acc'])}%."
        + (
            f" **Recommended by the rule: `{choice['recommended']}`**, {_acc(chosen['mean_test_acc'])}%"
            f" ({100 * chosen['below_best']:.2f} ± {100 * chosen['below_best_se']:.2f} below the best)."
            if choice["recommended"] != choice["best"]
            else " It is also the rule's choice."
        )
        + (
            f" Against the seed's `{choice['seed']}` ({_acc(seed['mean_test_acc'])}%):"
            f" {100 * chosen['over_seed']:+.2f} ± {100 * chosen['over_seed_se']:.2f} points on the mean."
            if seed is not None and seed is not chosen
            else ""
        )
        + f" Its rank per target ({', '.join(f'−{float(t):.0%}' for t in targets)}): "
        + ", ".join(f"{r} of {len(variants)}" for r in per_target_rank)
        + "."
        + "".join(
            f" At −{float(t):.0%} it is {100 * gap['gap']:.2f} ± {100 * gap['se']:.2f} points below `{gap['best']}`."
            for t, gap in chosen["below_target_best"].items()
            if gap["best"] != chosen["label"]
        ),
        "",
    ]
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """The generated part of ``BENCHMARKS.md``: machine, command, and every table."""
    machine, base, settings = results["machine"], results["baseline"], results["settings"]
    before, base_acc = base["params"], base["test_acc"]
    layer_names = " / ".join(results["layers"])
    dead = results["never_active"]
    lines = [
        f"_Generated by `{results['command']}` in {results['total_seconds'] / 60:.1f} min"
        f" ({'training loaded from the cache' if results['training']['cached'] else 'training included'};"
        f" training took {results['training']['train_seconds'] / 60:.1f} min)._",
        "",
        "### Machine",
        "",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), shared with other"
        f" jobs; `torch.set_num_threads({machine['torch_threads']})` for every measurement (training used"
        f" {results['training']['threads']})",
        f"- Python {machine['python']}, torch {machine['torch']}, lightning {machine['lightning']},"
        f" torch-pruning {machine['torch_pruning']} ({machine['platform']})",
        "",
        "### Setting",
        "",
        f"- Model: MLP {'-'.join(str(s) for s in results['training']['config']['sizes'])}, ReLU; Adam lr"
        f" {results['training']['config']['lr']}, batch {results['training']['config']['batch_size']},"
        f" {results['training']['config']['epochs']} epochs, seed {results['training']['config']['seed']}.",
        "- Data: Fashion-MNIST; train 50,000 / validation 10,000 (the last 10k training images; statistics and"
        " re-validation) / test 10,000 (every accuracy below). Pixels scaled to [0, 1].",
        f"- Unpruned: **{before:,} parameters**, {_mb(base['file_bytes'])} MB state_dict,"
        f" **test accuracy {_acc(base_acc)}%** (validation {_acc(base['val']['val_acc'])}%).",
        "- Accuracy is in %, its change Δ in percentage points against the unpruned model. **No method is"
        " fine-tuned after pruning.**",
        "",
        f"### 1. λ sweep (statistic `{settings['seed_statistic']}`)",
        "",
        "Statistics gathered once (one validation pass with an `ActivationRecorder`); for each λ the plan is"
        " re-made (`plan_pruning`) and applied (`apply_plan`) to a deep copy of the trained model."
        f" {sum(dead.values()):,} of the {sum(results['layers'].values()):,} hidden neurons never fire on the"
        f" validation set ({', '.join(f'`{k}` {v}' for k, v in dead.items())}: `nonzero_fraction` = 0); any λ > 0"
        " removes them.",
        "",
        f"| λ | neurons kept ({layer_names}) | parameters kept | reduction | file MB | test acc | Δ acc |",
        "| ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    marked = results["marked"]
    for row in results["seed_table"]:
        flag = (
            f" ◀ **≥{settings['marked_reduction']:.0%}**"
            if marked is not None and row["threshold"] == marked["threshold"]
            else ""
        )
        lines.append(
            f"| {row['threshold']:g}{flag} | {_widths(row['widths'])}"
            f" | {row['params']:,} ({_pct(1 - row['reduction'])}) | {_pct(row['reduction'])}"
            f" | {_mb(row['file_bytes'])} | {_acc(row['test_acc'])} | {_delta(row['test_acc'], base_acc)} |"
        )
    lines.append("")
    if marked is not None:
        lines.append(
            f"**The first λ that removes ≥{settings['marked_reduction']:.0%} of the parameters is λ ="
            f" {marked['threshold']:g}**: {before:,} → {marked['params']:,} parameters"
            f" (−{_pct(marked['reduction'])}), test accuracy {_acc(base_acc)}% → {_acc(marked['test_acc'])}%"
            f" ({_delta(marked['test_acc'], base_acc)} points)."
        )
    else:
        lines.append(f"No λ in the sweep removes ≥{settings['marked_reduction']:.0%} of the parameters.")
    lines += [
        "",
        "### 2. Against the alternatives, at equal parameter reduction",
        "",
        "- **ours (statistic)**: the package's plain functions; λ per target from its `threshold_for_reduction`"
        " (bisection on the pruned model's parameter count: the first λ that removes at least the target), in the"
        " statistic's own unit. **ours (mean, compensate)**: the same neurons as `mean`, with each removed neuron's"
        " mean validation activation folded into its consumer's bias (`plan_pruning(..., compensate=True)`)."
        f" **ours ({results['choice']['recommended']})**: the setting table 3 recommends.",
        "- **ModelPruning l1_unstructured**: Lightning's callback, global over every Linear weight and bias, zeroing"
        " as many values as ours (`mean`) removed. **ln_structured**: the same callback on the same hidden layers,"
        " zeroing the rows of the same number of neurons per layer (L2 norm); the bias and the next layer's"
        " columns stay. Both are applied once to the trained weights through the callback's own methods (`setup`,"
        " `apply_pruning`, `make_pruning_permanent`), without the lottery-ticket reset. Both only *mask*: the"
        ' parameter count, file and latency do not change (the columns say so); "nonzero" is what they reduce.',
        "- **Torch-Pruning magnitude L1/L2**: `tp.importance.GroupMagnitudeImportance(p)` over each neuron's group"
        " (its row and its column in the next layer); the same per-layer widths as ours (`mean`); the"
        " lowest-importance neurons are removed with the same surgery. **+ compensate**: the same neurons, with"
        " their mean activations folded into the next layer's bias (`plan_from_kept(..., compensate=True)`).",
        "- **random**: the same widths, neurons drawn at random; mean ± std over"
        f" {len(settings['random_seeds'])} seeds (the size/latency columns are seed 0's model).",
        "- Latency: median ms per forward (`torch.inference_mode`), all models of one target measured side by side"
        " in rotating order.",
        "",
        f"| target | method | λ | neurons kept ({layer_names}) | parameters | nonzero | file MB | test acc"
        " | Δ acc | latency b=1 ms | latency b=256 ms |",
        "| ---: | :--- | ---: | :---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    latencies = base.get("latency_ms_by_target", {})
    for target in settings["targets"]:
        unpruned = latencies.get(str(target), {})
        lines.append(
            f"| −{target:.0%} | unpruned | - | - | {before:,} | {before:,} | {_mb(base['file_bytes'])}"
            f" | {_acc(base_acc)} | - | {unpruned.get('1', math.nan):.3f} | {unpruned.get('256', math.nan):.2f} |"
        )
        for row in (r for r in results["comparison"] if r["target"] == target):
            accuracy = _acc(row["test_acc"])
            if row["test_acc_std"] is not None:
                accuracy += f" ± {100 * row['test_acc_std']:.2f}"
            threshold = "-" if row["threshold"] is None else f"{row['threshold']:.4g}"
            latency = row["latency_ms"] or {}
            params = f"{row['params']:,}" + (" (unchanged)" if row["family"] == "masked" else "")
            lines.append(
                f"| −{target:.0%} | {row['method']} | {threshold} | {_widths(row['widths'])} | {params}"
                f" | {row['nonzero']:,} | {_mb(row['file_bytes'])} | {accuracy} | {_delta(row['test_acc'], base_acc)}"
                f" | {latency.get('1', math.nan):.3f} | {latency.get('256', math.nan):.2f} |"
            )
    lines += [
        "",
        f"The plot also has the targets {', '.join(f'−{t:.0%}' for t in settings['plot_targets'])} (accuracy only).",
        "",
        "![test accuracy vs parameters kept](docs/benchmark_accuracy_vs_params.png)",
        "",
        *_grid_lines(results),
    ]
    cost = results["cost"]
    median = cost["median_seconds"]
    state_bytes = cost["metric_state_bytes"]
    memory = cost["peak_allocated_bytes"]
    extra_mb = (memory["statistics"] - memory["plain"]) / 1e6
    analysis = median["analysis_plan_surgery"]
    lines += [
        "### 4. Cost of pruning",
        "",
        f"One process, {cost['repeats']} rounds in rotating order, medians; a Trainer whose `fit` ran (zero"
        " epochs, so its validation data are the fit's), the trained weights, the validation set"
        " (all of it, in batches of 1,000).",
        "",
        "| what | median s | ratio to a plain validation pass |",
        "| :--- | ---: | ---: |",
        f"| plain `trainer.validate` | {median['plain']:.3f} | 1.00 |",
        f"| statistics pass (`trainer.validate` with an `ActivationRecorder`) | {median['statistics']:.3f}"
        f" | **{cost['statistics_ratio']:.3f}** |",
        "| dependency analysis + plan + surgery alone (`find_prunable_layers`, `plan_pruning`, `apply_plan`)"
        f" | {analysis:.3f} | {analysis / median['plain']:.3f} |",
        f"| `ActivationPruning(threshold={cost['threshold']:g}).on_fit_end` (statistics + analysis + plan + surgery"
        " + re-validation of the pruned model + report)"
        f" | {median['on_fit_end']:.3f} | **{cost['on_fit_end_ratio']:.2f}** |",
        "",
        "Statistics pass / plain pass, per round: "
        + ", ".join(f"{r:.3f}" for r in cost["statistics_ratio_per_round"])
        + " (target ≤ 1.10).",
        "",
        f"Memory of the statistics: the metric states hold **{sum(state_bytes.values()):,} bytes** in all ("
        + ", ".join(f"`{k}` {v:,}" for k, v in state_bytes.items())
        + "; four float64 sums per input feature of every measured layer, and a count). The transient peak is larger:"
        f" over one validation batch of {memory['batch']:,}, the most memory held through PyTorch's allocator"
        f" (torch.profiler allocation events) is {memory['plain'] / 1e6:.1f} MB for the plain forward and"
        f" {memory['statistics'] / 1e6:.1f} MB with the recorder, **+{extra_mb:.1f} MB** (the recorder's per-batch"
        " temporaries). The process RSS does not show it: the allocator reuses freed memory between passes.",
        "",
        "### 5. Speed of the pruned model",
        "",
        f"Median of {settings['speed_rounds']} rounds, models measured side by side; ratios are pruned / unpruned"
        " for latency (lower is better) and throughput (higher is better), next to the parameter ratio.",
        "",
        "| model | batch | parameter ratio | latency ms | latency ratio | throughput /s | throughput ratio |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["speed"]:
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['param_ratio']:.3f} | {row['latency_ms']:.3f}"
            f" | {row['latency_ratio']:.3f} | {row['throughput_per_s']:,.0f} | {row['throughput_ratio']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, generated: str) -> None:
    """Put ``generated`` between the markers of ``path``, keeping the hand-written text around them."""
    block = f"{BEGIN}\n{generated}\n{END}"
    text = path.read_text() if path.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + block + tail)


PALETTE = {
    "ours": ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:olive", "navy", "gold"],
    "masked": ["tab:brown", "tab:pink"],
    "magnitude": ["tab:cyan", "teal", "deepskyblue", "darkslategray"],
    "random": ["gray"],
}
STYLE = {"ours": ("-", "o"), "masked": (":", "x"), "magnitude": ("--", "s"), "random": ("-.", "v")}


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Test accuracy vs parameters kept for every method, on one chart (masked methods at their nonzero count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FormatStrFormatter

    before = results["baseline"]["params"]
    base_acc = results["baseline"]["test_acc"]
    figure, axes = plt.subplots(figsize=(11, 8))
    methods: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in results["comparison"]:
        methods[row["method"]].append(row)
    used: dict[str, int] = defaultdict(int)
    for method, rows in methods.items():
        rows = sorted(rows, key=lambda r: r["nonzero"])
        family = rows[0]["family"]
        colors = PALETTE[family]
        color = colors[used[family] % len(colors)]
        used[family] += 1
        linestyle, marker = STYLE[family]
        x = [100 * r["nonzero"] / before for r in rows]
        y = [100 * r["test_acc"] for r in rows]
        label = method + (" [masks only: x = nonzero values]" if family == "masked" else "")
        errors = [100 * (r["test_acc_std"] or 0.0) for r in rows] if family == "random" else None
        axes.errorbar(
            x,
            y,
            yerr=errors,
            linestyle=linestyle,
            marker=marker,
            color=color,
            label=label,
            capsize=3,
            linewidth=2 if family == "ours" else 1.2,
            markersize=5,
        )
    sweep = [r for r in results["seed_table"] if r["reduction"] < 1]
    axes.plot(
        [100 * (1 - r["reduction"]) for r in sweep],
        [100 * r["test_acc"] for r in sweep],
        linestyle="none",
        marker="+",
        markersize=11,
        markeredgewidth=1.5,
        color="black",
        label=f"ours ({results['settings']['seed_statistic']}), the λ sweep of table 1",
    )
    axes.axhline(100 * base_acc, color="black", linewidth=0.8, label=f"unpruned ({100 * base_acc:.2f}%)")
    axes.set_xscale("log")
    ticks = [1, 2, 3, 5, 10, 20, 30, 50, 70, 100]
    axes.xaxis.set_major_locator(FixedLocator(ticks))
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g%%"))
    axes.xaxis.set_minor_locator(FixedLocator([]))
    axes.set_xlim(min(100 * (1 - r["reduction"]) for r in sweep if r["test_acc"] > 0.2) * 0.8, 110)
    axes.set_xlabel("parameters kept, % of the unpruned model (log scale; nonzero values for the masking methods)")
    axes.set_ylabel("test accuracy, % (no fine-tuning)")
    axes.set_title("Fashion-MNIST, MLP 784-1024-1024-10: test accuracy vs parameters kept, one-shot pruning")
    lowest = min(100 * r["test_acc"] for r in results["comparison"])
    axes.set_ylim(max(0.0, lowest - 3), 100 * base_acc + 2)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    """Train (or load) the model, run every measurement, write BENCHMARKS.md, the plot and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="a directory with the four IDX .gz files")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install the dataset")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the trained weights go")
    parser.add_argument("--retrain", action="store_true", help="ignore cached weights")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement")
    parser.add_argument("--train-threads", type=int, default=2, help="torch.set_num_threads while training")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the Markdown and the plot from the last run's JSON"
    )
    args = parser.parse_args(argv)
    results_path = args.cache_dir / "fashion_mnist_results.json"
    if args.report_only:
        results = json.loads(results_path.read_text())
        write_markdown(args.markdown, render_markdown(results))
        plot(results, args.plot)
        return

    started = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    try:
        data_dir = locate_fashion_mnist(args.data_dir, install=not args.no_install)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    config = TrainConfig()
    train, val, test = load_fashion_mnist(data_dir, config.num_val)
    datamodule = SplitDataModule(train, val, test, batch_size=config.batch_size, seed=config.seed)
    log(f"data from {data_dir}: {len(train)} train / {len(val)} validation / {len(test)} test")
    torch.set_num_threads(args.train_threads)
    model, training = train_or_load(datamodule, config, args.cache_dir, retrain=args.retrain)
    torch.set_num_threads(args.threads)
    log(f"model {'loaded from the cache' if training['cached'] else 'trained'} ({training['train_seconds']:.0f}s)")

    results = run_benchmark(model, datamodule, Settings(), log=log)
    results["machine"] = machine_info()
    results["training"] = training
    results["command"] = " ".join(["python", "benchmarks/fashion_mnist.py", *(argv or sys.argv[1:])])
    results["total_seconds"] = time.perf_counter() - started
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2, default=str))
    write_markdown(args.markdown, render_markdown(results))
    plot(results, args.plot)
    log(f"wrote {args.markdown} and {args.plot}; total {results['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
