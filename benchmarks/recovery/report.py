"""The generated Markdown section of ``BENCHMARKS.md`` (between the ``recovery:begin``/``recovery:end`` markers)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import common

from .results import RecoveryResults, Row

BEGIN, END = "<!-- recovery:begin -->", "<!-- recovery:end -->"
TARGET_REDUCTION, TARGET_POINTS, TARGET_EPOCHS = 0.9, 0.5, 1
"""Issue 13's target: within 0.5 points of unpruned at −90 % with at most one recovery epoch."""


def _points(row: Row, base: float) -> str:
    return f"{100 * (row.test_acc - base):+.2f}"


def target_verdict(results: RecoveryResults) -> str:
    """Whether ours met the issue's target, in one sentence (or why it cannot be judged)."""
    ours = [
        r
        for r in results.rows
        if r.method.startswith("ours") and r.reduction == TARGET_REDUCTION and 0 < r.recovery_epochs <= TARGET_EPOCHS
    ]
    if not ours:
        return (
            f"Target not measured: no row of ours at -{TARGET_REDUCTION:.0%} with 1 to {TARGET_EPOCHS} recovery epoch."
        )
    best = max(ours, key=lambda r: r.test_acc)
    gap = 100 * (results.base.test_acc - best.test_acc)
    verdict = "met" if gap <= TARGET_POINTS else f"missed by {gap - TARGET_POINTS:.2f} points"
    return (
        f"Target (within {TARGET_POINTS} points of unpruned at -{TARGET_REDUCTION:.0%} with at most {TARGET_EPOCHS}"
        f" recovery epoch): **{verdict}** ({-gap:+.2f} points against unpruned after {best.recovery_epochs} epoch)."
    )


GRADUAL_COMMIT = "14d8739"
"""The last commit with gradual pruning (``pruning_steps``), removed after it did not beat one prune."""


def _gradual_note(results: RecoveryResults) -> str:
    gradual = sorted({(r.method, r.recovery_epochs) for r in results.rows if "gradual" in r.method})
    if not gradual:
        return (
            "- Gradual pruning (several prunes over training): not offered; it did not beat one prune with the same"
            f" epochs (measured at commit {GRADUAL_COMMIT}, when it existed)."
        )
    epochs = results.config.train.epochs
    shown = ", ".join(f"{method} at R={r}" for method, r in gradual)
    return (
        f"- Gradual pruning ({shown}), measured at commit {GRADUAL_COMMIT}, when the option existed (it was removed"
        " since: it did not beat one prune): `ActivationPruning(target_params_reduction=r, recovery_epochs=R,"
        f" pruning_steps=2)` in one fit of {epochs} + R epochs, the first prune after epoch {epochs} (to"
        " r·(1 − 1/8) of the original parameters, the cubic schedule), the second R // 2 epochs later (to r); compare"
        " with ours at the same R, which prunes once after epoch E."
    )


def render_markdown(results: RecoveryResults) -> str:
    """The section: command, machine, the accuracy table, the epoch-time table and what is not measured."""
    config, base, machine = results.config, results.base, results.machine
    versions = machine.versions
    epochs = config.train.epochs
    threads = f"{machine.torch_threads} thread{'' if machine.torch_threads == 1 else 's'}"
    lines = [
        "### Recovery epochs vs one-shot, Torch-Pruning + fine-tuning and training from scratch (generated)",
        "",
        f"Command: `{results.command}` ({results.total_seconds / 60:.1f} min). Machine: {machine.cpu},"
        f" {machine.usable_cores} usable cores, torch {versions['torch']} ({threads}), lightning"
        f" {versions['lightning']}, torch-pruning {versions['torch-pruning']}, Python {machine.python}.",
        "",
        f"Unpruned: MLP {'-'.join(map(str, config.train.sizes))} trained {epochs} epochs (Adam lr {config.train.lr},"
        f" batch {config.train.batch_size}, seed {config.train.seed}): {base.params:,} parameters, test accuracy"
        f" {base.test_acc:.4f}. Recovery epochs: R ∈ {{{', '.join(map(str, config.recovery_epochs))}}}; from scratch"
        f" trains {epochs} + R epochs. Δ is in accuracy points against unpruned, on the 10k test images.",
        "",
        target_verdict(results),
        "",
        "| target | method | R | params | widths | test acc | Δ (points) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for row in results.rows:
        target = "—" if row.reduction == 0 else f"-{row.reduction:.0%}"
        removed = 1 - row.params / base.params
        lines.append(
            f"| {target} | {row.method} | {row.recovery_epochs} | {row.params:,} ({removed:.1%} off)"
            f" | {'-'.join(map(str, row.widths))} | {row.test_acc:.4f} | {_points(row, base.test_acc)} |"
        )
    lines += [
        "",
        "- Recalibration: n/a (the MLP has no BatchNorm).",
        _gradual_note(results),
        "- Torch-Pruning is fine-tuned with a fresh Adam (it has no way to carry the optimizer state); ours keeps"
        " the same Adam with its state sliced.",
        "",
        "Seconds per training epoch (training batches only, validation not timed), the unpruned epoch and the"
        " recovery epochs of the same fit, and the test accuracy right after the callback's prune inside `fit`"
        " (before any recovery epoch):",
        "",
        "| target | R | unpruned epoch (s) | recovery epochs (s) | ratio | acc. right after prune |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for time in results.times:
        recovery = ", ".join(f"{s:.2f}" for s in time.recovery_seconds)
        lines.append(
            f"| -{time.reduction:.0%} | {time.recovery_epochs} | {time.unpruned_seconds:.2f} | {recovery}"
            f" | {time.ratio:.2f} | {time.test_acc_after_prune:.4f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, generated: str) -> None:
    """Replace what lies between the recovery markers of ``path`` (appended at its end if they are missing)."""
    common.write_section(path, generated, BEGIN, END)
