"""The default criterion on the BatchNorm ResNet: ``ActivationPruning``'s default now against the old default.

Run from the repository root (CPU; a few minutes per seed and target on one thread)::

    python -m benchmarks.fashion_cnn.default_criterion                      # -50 %, seeds 0 1 2
    python -m benchmarks.fashion_cnn.default_criterion --targets 0.5 0.7
    python -m benchmarks.fashion_cnn.default_criterion --report-only        # re-render from the JSON

Per seed, the ResNet of :mod:`benchmarks.fashion_cnn` (2 epochs, cached) gives the unpruned test accuracy; then, per
target, two real ``Trainer.fit`` runs of 3 epochs with ``ActivationPruning(target_params_reduction=r,
recovery_epochs=1)`` (the benchmark's :func:`~benchmarks.fashion_cnn.methods.fit_with_recovery`): **new default**
(no ``statistic``: BatchNorm-normalised channels by RMS standardised together, the rest by standardised
fluctuation; every prunable group of this ResNet is BatchNorm-normalised) and **old default** (``statistic:
fluctuation``, standardised per layer, what no ``statistic`` meant before). Both fits train the same 2 epochs
before the prune (same seed); only the criterion differs.

It writes the section between the ``default-criterion:begin``/``default-criterion:end`` markers of
``BENCHMARKS.md`` and stores every number in ``benchmarks/.cache/default_criterion_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    DEFAULT_CACHE,
    DEFAULT_MARKDOWN,
    Evaluator,
    SplitDataModule,
    command_line,
    last_results,
    load_fashion_mnist,
    locate_fashion_mnist,
    machine_info,
    markdown_table,
    mean_spread,
    quiet_run_log,
    write_section,
)

from .methods import fit_with_recovery, group_channels
from .models import ResNetClassifier, train_or_load
from .results import CNNTrainConfig

RESULTS_FILE = "default_criterion_results.json"
BEGIN, END = "<!-- default-criterion:begin -->", "<!-- default-criterion:end -->"
CRITERIA = {"new default": {}, "old default": {"statistic": "fluctuation", "normalize": True}}


def run(
    data_dir: Path | None,
    seeds: Sequence[int],
    targets: Sequence[float],
    cache_dir: Path,
    log=print,
    save=lambda partial: None,
) -> dict:
    """Per seed and target: the unpruned accuracy, and per criterion the accuracy after one recovery epoch.

    ``save`` gets the results so far after every row (a run stopped early keeps its finished seeds).
    """
    train, val, test = load_fashion_mnist(locate_fashion_mnist(data_dir), CNNTrainConfig.num_val)
    rows = []
    for seed in seeds:
        config = dataclasses.replace(CNNTrainConfig(), seed=seed)
        datamodule = SplitDataModule(train, val, test, batch_size=config.batch_size, seed=seed)
        evaluator = Evaluator(datamodule)
        base, _ = train_or_load(datamodule, config, cache_dir)
        unpruned = evaluator.test_accuracy(base)
        log(f"seed {seed}: unpruned {unpruned:.4f}")

        def build(config: CNNTrainConfig = config) -> ResNetClassifier:
            return ResNetClassifier(config.widths, None, config.lr)

        for target in targets:
            row = {"seed": seed, "target": target, "unpruned": unpruned}
            for label, options in CRITERIA.items():
                model, pruning, _ = fit_with_recovery(build, datamodule, config.epochs, seed, target, **options)
                result = pruning.result
                if result is None or not result.pruned:
                    raise RuntimeError(f"ActivationPruning did not prune at -{target:.0%} ({label}, seed {seed})")
                row[label] = {
                    "test_acc": evaluator.test_accuracy(model),
                    "params_reduction": result.params_reduction,
                    "channels": list(group_channels(result.plan).values()),
                    "scored_by_rms": len(result.plan.scored_by),
                }
                log(f"seed {seed} -{target:.0%} {label}: {row[label]}")
            rows.append(row)
            save({"seeds": sorted({r["seed"] for r in rows}), "targets": list(targets), "rows": rows})
    return {"seeds": list(seeds), "targets": list(targets), "rows": rows}


def render(results: dict) -> str:
    """The Markdown section: per target, mean ± std of the accuracy after one recovery epoch and Δ vs unpruned."""
    table = []
    for target in results["targets"]:
        rows = [r for r in results["rows"] if r["target"] == target]
        cells = [f"−{target:.0%}", mean_spread([100 * r["unpruned"] for r in rows])]
        for label in CRITERIA:
            cells.append(mean_spread([100 * r[label]["test_acc"] for r in rows]))
            cells.append(mean_spread([100 * (r[label]["test_acc"] - r["unpruned"]) for r in rows]))
        cells.append(mean_spread([100 * (r["new default"]["test_acc"] - r["old default"]["test_acc"]) for r in rows]))
        table.append(cells)
    header = ["target", "unpruned", "new default", "Δ", "old default", "Δ", "new − old (paired)"]
    channels = [
        f"−{r['target']:.0%} seed {r['seed']}: new {'/'.join(map(str, r['new default']['channels']))}"
        f" (−{r['new default']['params_reduction']:.1%}), old {'/'.join(map(str, r['old default']['channels']))}"
        f" (−{r['old default']['params_reduction']:.1%})"
        for r in results["rows"]
    ]
    return "\n".join(
        [
            f"Test accuracy (%) after one recovery epoch, mean ± std over seeds {results['seeds']} (Δ: points against"
            f" unpruned). Command: `{results['command']}` ({results['seconds'] / 60:.1f} min, under `nice`)."
            f" Machine: {results['machine']}.",
            "",
            markdown_table(header, table, align="lrrrrrr"),
            "",
            "Channels kept per group (the order of the section above) and parameters removed: " + "; ".join(channels)
            + ".",
        ]
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    """Measure (or re-render) and write the section of BENCHMARKS.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fashion_cnn.default_criterion", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    path = args.cache_dir / RESULTS_FILE
    if args.report_only:
        write_section(args.markdown, render(json.loads(last_results(path))), BEGIN, END)
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    log = quiet_run_log()

    args.cache_dir.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        results.update(
            command=command_line("benchmarks.fashion_cnn.default_criterion", argv),
            machine=machine_info().describe(),
            seconds=time.perf_counter() - started,
        )
        path.write_text(json.dumps(results, indent=1))

    results = run(args.data_dir, args.seeds, args.targets, args.cache_dir, log, save)
    save(results)
    write_section(args.markdown, render(results), BEGIN, END)
    log(f"wrote {args.markdown} and {path}")


if __name__ == "__main__":
    main()
