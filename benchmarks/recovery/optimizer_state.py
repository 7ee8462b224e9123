"""What the optimizer keeps at the prune: ``optimizer_state`` carry vs reset vs fresh on the recovery benchmark's MLP.

Run from the repository root (CPU; about 15 to 30 minutes on one thread, most of it training the bases once)::

    python -m benchmarks.recovery.optimizer_state                       # -90 %, one recovery epoch, seeds 0 1 2
    python -m benchmarks.recovery.optimizer_state --report-only         # re-render from the JSON

For each seed, the base of :mod:`benchmarks.recovery` (the 784-1024-1024-10 MLP, Adam lr 1e-3, batch 128, ``E``
epochs; its checkpoint after ``E - 1`` epochs is cached under ``benchmarks/.cache`` and shared with that benchmark)
is resumed three times in a real ``Trainer.fit`` of ``E + 1`` epochs with
``ActivationPruning(target_params_reduction=r, recovery_epochs=1, optimizer_state=s)``: the same epoch ``E``, the same
prune, then one recovery epoch in which only what Adam kept differs. The comparison is paired: per seed, each state's
test accuracy minus carry's.

It writes the section between the ``optimizer-state:begin``/``optimizer-state:end`` markers of ``BENCHMARKS.md`` and
stores every number in ``benchmarks/.cache/optimizer_state_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    DEFAULT_CACHE,
    DEFAULT_MARKDOWN,
    TrainConfig,
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
from lightning_actprune._optimizer import OPTIMIZER_STATES

from .protocol import EpochSeededDataModule, ours_with_recovery, test_accuracy, train_base
from .results import RecoveryConfig

RESULTS_FILE = "optimizer_state_results.json"
BEGIN, END = "<!-- optimizer-state:begin -->", "<!-- optimizer-state:end -->"


def run(data_dir: Path | None, seeds: Sequence[int], reduction: float, epochs: int, cache_dir: Path, log=print) -> dict:
    """Per seed: the base's test accuracy and, per state, the test accuracy after one recovery epoch."""
    rows = []
    train, val, test = load_fashion_mnist(locate_fashion_mnist(data_dir), TrainConfig.num_val)
    for seed in seeds:
        config = RecoveryConfig(train=dataclasses.replace(TrainConfig(), epochs=epochs, seed=seed))
        datamodule = EpochSeededDataModule(train, val, test, batch_size=config.train.batch_size, seed=seed)
        checkpoint = cache_dir / f"recovery_base_{config.base_key()}_e{epochs - 1}.ckpt"
        base, _, _, _ = train_base(datamodule, config.train, checkpoint)
        row = {"seed": seed, "unpruned": test_accuracy(base, datamodule.test_dataloader())}
        log(f"seed {seed}: unpruned {row['unpruned']:.4f}")
        for state in OPTIMIZER_STATES:
            _model, probe = ours_with_recovery(config.train, datamodule, checkpoint, reduction, 1, state)
            row[state] = probe.test_acc[-1]
            row[f"{state}_params"] = probe.params[-1]
            log(f"seed {seed}: {state} {row[state]:.4f} ({probe.params[-1]:,} parameters)")
        rows.append(row)
    return {"reduction": reduction, "epochs": epochs, "rows": rows}


def render(results: dict) -> str:
    """The Markdown section: the table per seed, mean ± std, the paired differences against carry."""
    rows, reduction = results["rows"], results["reduction"]
    table = [
        [row["seed"], f"{100 * row['unpruned']:.2f}", *(f"{100 * row[s]:.2f}" for s in OPTIMIZER_STATES)]
        for row in rows
    ]
    table.append(
        [
            "mean ± std",
            mean_spread([100 * r["unpruned"] for r in rows]),
            *(mean_spread([100 * r[s] for r in rows]) for s in OPTIMIZER_STATES),
        ]
    )
    table.append(
        [
            "vs carry (paired)",
            "",
            *(mean_spread([100 * (r[s] - r["carry"]) for r in rows]) for s in OPTIMIZER_STATES),
        ]
    )
    header = ["seed", "unpruned", *(f"`{s}`" for s in OPTIMIZER_STATES)]
    params, first = rows[0]["carry_params"], rows[0]["seed"]
    return "\n".join(
        [
            f"Test accuracy (%) of the MLP at −{reduction:.0%} parameters ({params:,} left at seed {first}) after one"
            f" recovery epoch, base trained {results['epochs']} epochs. Command: `{results['command']}`"
            f" ({results['seconds'] / 60:.1f} min, under `nice`). Machine: {results['machine']}.",
            "",
            markdown_table(header, table, align="lrrrr"),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Measure (or re-render) and write the section of BENCHMARKS.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery.optimizer_state", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reduction", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="E: epochs of the unpruned model")
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

    results = run(args.data_dir, args.seeds, args.reduction, args.epochs, args.cache_dir, log)
    results.update(
        command=command_line("benchmarks.recovery.optimizer_state", argv),
        machine=machine_info().describe(),
        seconds=time.perf_counter() - started,
    )
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    write_section(args.markdown, render(results), BEGIN, END)
    log(f"wrote {args.markdown} and {path}")
    for state in OPTIMIZER_STATES:
        log(f"{state}: {statistics.fmean(r[state] for r in results['rows']):.4f}")


if __name__ == "__main__":
    main()
