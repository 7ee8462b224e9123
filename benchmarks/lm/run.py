"""The protocol over seeds, and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.common import command_line, machine_info, quiet_trainer, write_section
from lightning_actprune.core import PruningResult, count_parameters, find_prunable_layers

from .data import EXCLUDED_DIRECTORIES, SPLITS, Corpus, CorpusConfig, CorpusDataModule
from .methods import (
    TP_IMPORTANCES,
    EpochClock,
    fine_tune,
    fit_from,
    from_scratch,
    ours,
    ours_by_steps,
    torch_pruning_at,
    train_base,
)
from .model import ByteLM, ModelConfig, evaluate, layer_widths
from .report import BEGIN, END, render_markdown
from .results import (
    OURS,
    OURS_RECOVERED,
    SCRATCH,
    UNPRUNED,
    UNPRUNED_LONGER,
    CorpusFacts,
    LMResults,
    OursPlan,
    ParameterCount,
    PlanLayer,
    Row,
    RunConfig,
    SeedRun,
    StepRecovery,
    default_gqa_unit,
    other_gqa_unit,
    ours_with_unit,
    tp_method,
)

DEFAULT_OUT = Path("benchmarks/.cache/lm_results.json")
QUICK = RunConfig(
    corpus=CorpusConfig(test_bytes=2_000, val_bytes=2_000, context=32, max_files=12),
    # 4 query heads per key/value head, as the default: with 2, Torch-Pruning 1.6.1's MetaPruner does not finish
    model=ModelConfig(hidden_size=64, layers=2, heads=8, kv_heads=2, head_dim=8, intermediate_size=128, context=32),
    epochs=2,
    steps_per_epoch=2,
    batch_size=4,
    eval_batch_size=64,
    reductions=(0.3,),  # the tiny model's FFN is too small a share of it for -50 %
    taylor_batches=1,
    bisection_steps=3,
)
"""``--quick``: a tiny Llama on the first 12 files, 2 steps per epoch; the whole protocol in seconds."""


def parameter_count(model: ByteLM) -> ParameterCount:
    """The model's parameters by part."""
    net = model.model

    def total(predicate: Callable[[str], bool]) -> int:
        return sum(p.numel() for n, p in net.named_parameters() if predicate(n))

    return ParameterCount(
        total=count_parameters(model),
        embedding=net.model.embed_tokens.weight.numel(),
        lm_head=0 if net.lm_head.weight is net.model.embed_tokens.weight else net.lm_head.weight.numel(),
        attention=total(lambda n: ".self_attn." in n),
        ffn=total(lambda n: ".mlp." in n),
        norms=total(lambda n: "norm" in n),
        tied=net.lm_head.weight is net.model.embed_tokens.weight,
    )


def corpus_facts(corpus: Corpus) -> CorpusFacts:
    """The file list and the size of each split."""
    return CorpusFacts(
        root=corpus.root,
        excluded_directories=list(EXCLUDED_DIRECTORIES),
        files=corpus.files,
        bytes={split: corpus.bytes_in(split) for split in SPLITS},
        chunks={split: len(getattr(corpus, split)) for split in SPLITS},
        scored_tokens={split: getattr(corpus, split).scored_tokens for split in SPLITS},
    )


def _plan(
    seed: int, reduction: float, result: PruningResult, clock: EpochClock, messages: list[str], gqa_unit: str
) -> OursPlan:
    """What ours + recovery pruned (its plan is the one-shot plan: the same weights, the same statistics)."""
    return OursPlan(
        seed=seed,
        reduction=reduction,
        threshold=result.plan.threshold,
        statistic=result.plan.statistic,
        layers=[PlanLayer.of(x.name, x.neurons, len(x.kept)) for x in result.plan.layers],
        prunable_layers=[x.name for x in result.plan.layers],
        val_loss_before=result.metrics_before["val_loss"],
        val_loss_after=result.metrics_after["val_loss"],
        test_loss_right_after_prune_in_fit=clock.test_loss[0],
        messages=messages,
        gqa_unit=gqa_unit,
    )


def _validation_seconds(model: ByteLM, datamodule: CorpusDataModule) -> float:
    started = time.perf_counter()
    quiet_trainer().validate(model, datamodule=datamodule, verbose=False)
    return time.perf_counter() - started


def run_seed(
    config: RunConfig,
    corpus: Corpus,
    seed: int,
    cache_dir: Path,
    log: Callable[[str], None] = print,
    on_row: Callable[[SeedRun], None] | None = None,
) -> SeedRun:
    """The whole protocol at one seed: base, unpruned, then every method at every reduction.

    ``on_row`` gets the seed's measurements so far after every row (an interrupted seed keeps the rows it finished).
    """
    epochs, steps, recovery = config.epochs, config.steps_per_epoch, config.recovery_epochs
    datamodule = CorpusDataModule(corpus, config.batch_size, config.eval_batch_size, seed)
    test_loader = datamodule.test_dataloader()
    checkpoint = cache_dir / f"lm_base_{config.base_key(seed)}_e{epochs - 1}.ckpt"
    base_seconds, cached = train_base(config.model, datamodule, seed, epochs, steps, checkpoint)
    log(f"seed {seed}: base after {epochs - 1} epochs {'(cached)' if cached else f'in {base_seconds:.0f} s'}")

    clock = EpochClock(test_loader, snapshot_epoch=epochs - 1)
    fit_from(config.model, datamodule, checkpoint, epochs + recovery, steps, [clock])
    unpruned = clock.snapshot
    assert unpruned is not None
    unpruned.eval()
    validation = [_validation_seconds(unpruned, datamodule)]
    started = time.perf_counter()
    test_loss = evaluate(unpruned, test_loader)
    test_seconds = time.perf_counter() - started
    widths = layer_widths(unpruned)
    params = count_parameters(unpruned)
    rows = [
        Row(seed, 0.0, UNPRUNED, 0, params, test_loss, widths),
        Row(seed, 0.0, UNPRUNED_LONGER, recovery, params, clock.test_loss[-1], widths),
    ]
    log(f"seed {seed}: unpruned {params:,} parameters, test loss {test_loss:.4f} ({rows[-1].test_loss:.4f} later)")
    analysis_started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        find_prunable_layers(unpruned, corpus.val.inputs[:2])
    analysis_seconds = time.perf_counter() - analysis_started

    example = corpus.val.inputs[:1]
    shifted = datamodule.shifted(epochs)  # the order of the recovery epochs of a resumed fit
    gradient_batches = [
        batch for _, batch in zip(range(config.taylor_batches), shifted.train_dataloader(), strict=False)
    ]
    plans: list[OursPlan] = []
    step_recoveries: list[StepRecovery] = []

    def so_far() -> SeedRun:
        return SeedRun(
            seed=seed,
            base_seconds=base_seconds,
            base_cached=cached,
            unpruned_val_loss=clock.val_loss[0],
            validation_seconds=list(validation),
            test_seconds=test_seconds,
            train_epoch_seconds=clock.seconds[0],
            analysis_seconds=analysis_seconds,
            rows=list(rows),
            plans=list(plans),
            step_recoveries=list(step_recoveries),
        )

    def add(row: Row) -> None:
        rows.append(row)
        log(
            f"seed {seed} -{row.reduction:.0%} {row.method} +{row.epochs_after_prune} epochs: {row.params:,}"
            f" parameters, test ppl {row.test_ppl:.3f}"
        )
        if on_row is not None:
            on_row(so_far())

    for reduction in config.reductions:
        one_shot, result, _, seconds, messages = ours(config.model, datamodule, checkpoint, epochs, steps, reduction)
        add(
            Row(
                seed,
                reduction,
                OURS,
                0,
                count_parameters(one_shot),
                evaluate(one_shot, test_loader),
                layer_widths(one_shot),
                prune_seconds=seconds,
            )
        )
        recovered, _, clock_r, seconds_r, _ = ours(
            config.model, datamodule, checkpoint, epochs, steps, reduction, recovery
        )
        plans.append(_plan(seed, reduction, result, clock_r, messages, default_gqa_unit()))
        add(
            Row(
                seed,
                reduction,
                OURS_RECOVERED,
                recovery,
                count_parameters(recovered),
                clock_r.test_loss[-1],
                layer_widths(recovered),
                prune_seconds=seconds_r,
                train_epoch_seconds=clock_r.seconds[1:],
            )
        )
        if config.compare_gqa_unit:
            unit = other_gqa_unit()
            other, result_u, clock_u, seconds_u, messages_u = ours(
                config.model, datamodule, checkpoint, epochs, steps, reduction, recovery, unit
            )
            params_u, widths_u = count_parameters(other), layer_widths(other)
            # its one-shot row: the test loss right after the prune inside the fit (the same prune as at fit's end)
            add(Row(seed, reduction, ours_with_unit(OURS, unit), 0, params_u, clock_u.test_loss[0], widths_u))
            add(
                Row(
                    seed,
                    reduction,
                    ours_with_unit(OURS_RECOVERED, unit),
                    recovery,
                    params_u,
                    clock_u.test_loss[-1],
                    widths_u,
                    prune_seconds=seconds_u,
                    train_epoch_seconds=clock_u.seconds[1:],
                )
            )
            plans.append(_plan(seed, reduction, result_u, clock_u, messages_u, unit))
        for recovery_steps in config.recovery_step_counts:
            for weight in config.distill_weights:
                stepped, _, step_clock, seconds_s, _ = ours_by_steps(
                    config.model,
                    datamodule,
                    checkpoint,
                    epochs,
                    steps,
                    reduction,
                    recovery_steps,
                    weight,
                    config.distill_temperature,
                )
                assert step_clock.test_loss_after_prune is not None
                record = StepRecovery(
                    seed=seed,
                    reduction=reduction,
                    recovery_steps=recovery_steps,
                    distill_weight=weight,
                    distill_temperature=config.distill_temperature,
                    params=count_parameters(stepped),
                    widths=layer_widths(stepped),
                    test_loss_after_prune=step_clock.test_loss_after_prune,
                    test_loss=evaluate(stepped, test_loader),
                    prune_seconds=seconds_s,
                    step_seconds=step_clock.seconds,
                )
                step_recoveries.append(record)
                if on_row is not None:
                    on_row(so_far())
                log(
                    f"seed {seed} -{reduction:.0%} ours + {recovery_steps} recovery steps"
                    f"{f', distill_weight {weight}' if weight else ''}: test ppl {record.test_ppl_after_prune:.3f}"
                    f" after the prune, {record.test_ppl:.3f} after recovery;"
                    f" {statistics.median(record.step_seconds):.3f} s a step (median)"
                )
        budget = count_parameters(one_shot)
        tp_scopes = config.tp_scopes if config.tp_reductions is None or reduction in config.tp_reductions else ()
        for scope in tp_scopes:
            for importance in TP_IMPORTANCES:
                method = tp_method(importance, scope)
                pruned, ratio, search, prune = torch_pruning_at(
                    unpruned, importance, budget, example, gradient_batches, config.bisection_steps, scope
                )
                tp_params, tp_widths = count_parameters(pruned), layer_widths(pruned)
                add(
                    Row(
                        seed,
                        reduction,
                        method,
                        0,
                        tp_params,
                        evaluate(pruned, test_loader),
                        tp_widths,
                        prune_seconds=prune,
                        search_seconds=search,
                        ratio=ratio,
                    )
                )
                tuned, tuned_clock = fine_tune(pruned, shifted, recovery, steps, checkpoint.parent)
                add(
                    Row(
                        seed,
                        reduction,
                        method,
                        recovery,
                        tp_params,
                        evaluate(tuned, test_loader),
                        tp_widths,
                        train_epoch_seconds=tuned_clock.seconds,
                        ratio=ratio,
                    )
                )
        if config.scratch:
            scratch, scratch_clock = from_scratch(
                config.model, result, datamodule, seed, epochs + recovery, steps, checkpoint.parent
            )
            add(
                Row(
                    seed,
                    reduction,
                    SCRATCH,
                    recovery,
                    count_parameters(scratch),
                    evaluate(scratch, test_loader),
                    layer_widths(scratch),
                    train_epoch_seconds=scratch_clock.seconds,
                )
            )
    validation.append(_validation_seconds(unpruned, datamodule))
    return so_far()


def run_benchmark(
    config: RunConfig,
    cache_dir: Path,
    command: str,
    log: Callable[[str], None] = print,
    on_seed: Callable[[LMResults], None] | None = None,
) -> LMResults:
    """Every seed of ``config``; the results as records.

    ``on_seed`` gets the results so far after each seed, and after each row of a seed (that seed unfinished).
    """
    started = time.perf_counter()
    corpus = Corpus.load(config.corpus)
    log(
        f"corpus: {len(corpus.files)} files under {corpus.root}, "
        + ", ".join(f"{split} {corpus.bytes_in(split):,} bytes" for split in SPLITS)
    )
    runs: list[SeedRun] = []
    facts, parameters, machine = corpus_facts(corpus), parameter_count(ByteLM(config.model)), machine_info()

    def results_of(seeds: list[SeedRun]) -> LMResults:
        return LMResults(
            config=config
            if len(seeds) == len(config.seeds)
            else dataclasses.replace(config, seeds=(*config.seeds[: len(seeds)],)),
            corpus=facts,
            parameters=parameters,
            seeds=seeds,
            machine=machine,
            command=command,
            total_seconds=time.perf_counter() - started,
        )

    def on_row(partial: SeedRun) -> None:
        if on_seed is not None:
            on_seed(results_of([*runs, partial]))

    for seed in config.seeds:
        runs.append(run_seed(config, corpus, seed, cache_dir, log, on_row))
        results = results_of(list(runs))
        if on_seed is not None:
            on_seed(results)
    return results


def _quiet() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")


def parse_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from the parsed command line (``--quick`` first, the other options over it)."""
    base = QUICK if args.quick else RunConfig()
    changes = {
        name: value
        for name, value in {
            "epochs": args.epochs,
            "steps_per_epoch": args.steps_per_epoch,
            "reductions": tuple(args.reductions) if args.reductions else None,
            "seeds": tuple(args.seeds) if args.seeds else None,
            "step_fractions": tuple(args.step_fractions) if args.step_fractions is not None else None,
            "distill_weights": tuple(args.distill_weights) if args.distill_weights else None,
            "distill_temperature": args.distill_temperature,
            "tp_reductions": tuple(args.tp_reductions) if args.tp_reductions is not None else None,
        }.items()
        if value is not None
    }
    scopes = (*base.tp_scopes, "hidden") if args.tp_hidden else base.tp_scopes
    return dataclasses.replace(
        base, scratch=args.scratch, tp_scopes=scopes, compare_gqa_unit=not args.no_gqa_compare, **changes
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; write the JSON and the Markdown report."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lm",
        description="A small Llama on the standard library's bytes: ours vs Torch-Pruning's LLM recipe.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0)")
    parser.add_argument("--reductions", type=float, nargs="+", default=None, help="parameter reductions (0.3 0.5)")
    parser.add_argument("--epochs", type=int, default=None, help=f"E: epochs before pruning ({RunConfig.epochs})")
    parser.add_argument(
        "--steps-per-epoch", type=int, default=None, help=f"S: batches per epoch ({RunConfig.steps_per_epoch})"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="file whose lm:begin/lm:end section gets the report (default: --out with .md)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="base checkpoints (default: beside --out)")
    parser.add_argument("--quick", action="store_true", help="a tiny model on a few files, a few steps (tests)")
    parser.add_argument("--scratch", action="store_true", help="also train ours' widths from scratch (E + R epochs)")
    parser.add_argument("--tp-hidden", action="store_true", help="also Torch-Pruning's recipe as written (hidden too)")
    parser.add_argument(
        "--no-gqa-compare", action="store_true", help="leave out ours with the other `gqa_unit` (see --help text)"
    )
    parser.add_argument(
        "--step-fractions",
        type=float,
        nargs="*",
        default=None,
        help="ours + recovery by steps, N = fraction × S each (default 1 0.25; none: no step recovery)",
    )
    parser.add_argument(
        "--distill-weights", type=float, nargs="+", default=None, help="each step recovery's distill_weight (0 0.5)"
    )
    parser.add_argument("--distill-temperature", type=float, default=None, help="distill_temperature (2)")
    parser.add_argument(
        "--tp-reductions",
        type=float,
        nargs="*",
        default=None,
        help="the reductions of Torch-Pruning's rows (default: every reduction; a smaller scope to save time)",
    )
    parser.add_argument("--report-only", action="store_true", help="re-render the report from --out")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="with --report-only: merge these runs' results (one seed each, say) into --out, then render it",
    )
    args = parser.parse_args(argv)
    markdown = args.markdown or args.out.with_suffix(".md")
    if args.merge and not args.report_only:
        parser.error("--merge combines finished runs: use it with --report-only")
    if args.merge:
        missing = [str(path) for path in args.merge if not path.is_file()]
        if missing:
            parser.error(f"--merge: no such results file: {', '.join(missing)}")
        try:
            merged = LMResults.merge([LMResults.from_json(path.read_text()) for path in args.merge])
        except ValueError as error:
            parser.error(f"--merge: {error}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(merged.to_json())
    if args.report_only:
        if not args.out.is_file():
            parser.error(f"--report-only renders an earlier run's results; {args.out} does not exist")
        write_section(markdown, render_markdown(LMResults.from_json(args.out.read_text())), BEGIN, END)
        return
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer; got {args.threads}")
    try:
        config = parse_config(args)
    except ValueError as error:
        parser.error(str(error))
    _quiet()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    def write(results: LMResults) -> None:  # after every row: an interrupted run keeps the rows it finished
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(results.to_json())
        write_section(markdown, render_markdown(results), BEGIN, END)
        rows = len(results.seeds[-1].rows) + len(results.seeds[-1].step_recoveries)
        log(
            f"wrote {args.out} and {markdown} ({len(results.seeds)} seed(s), the last with {rows} rows);"
            f" {results.total_seconds / 60:.1f} min"
        )

    with tempfile.TemporaryDirectory() as scratch_dir:
        cache_dir = args.cache_dir or (args.out.parent / "lm" if not args.quick else Path(scratch_dir))
        run_benchmark(config, cache_dir, command_line("benchmarks.lm", argv), log, on_seed=write)
