"""The sweep: each family checked in a process of its own (capped in memory and CPU time), the JSON, the report."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from benchmarks.common import command_line, machine_info, write_section

from .families import Family, catalogue, find
from .report import BEGIN, END, render_markdown
from .results import ERROR, FamilyResult, SweepResults

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "benchmarks" / ".cache" / "hf_families.json"
PRELOAD = (
    "torch",
    "torch_pruning",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation",
    "lightning_actprune",
    "benchmarks.hf_families.check",
)
"""What the fork server imports once, so that no family's process pays for it (or counts it in its CPU time)."""


@dataclasses.dataclass(frozen=True)
class Caps:
    """What one family's process may use before it is stopped (its row then says which cap it hit)."""

    memory_gb: float = 4.0
    """``RLIMIT_DATA``: past it, allocations fail (``MemoryError``)."""
    cpu_seconds: int = 120
    """``RLIMIT_CPU``: past it, the process is killed (``SIGXCPU``)."""
    wall_seconds: float = 600.0
    """Past it, the process is killed (a machine shared with other work runs slower than the CPU cap says)."""


def _in_child(family: Family, connection: Connection, caps: Caps, log: str) -> None:
    """A family's process: capped, one thread, output to the log; its result goes back through ``connection``."""
    memory = int(caps.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (caps.cpu_seconds, caps.cpu_seconds + 5))
    with open(log, "a") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
    print(f"==== {family.name} ({family.model_class}) ====", flush=True)
    import torch

    from .check import check

    torch.set_num_threads(1)
    result = check(family)
    sys.stdout.flush()
    sys.stderr.flush()
    connection.send(result.to_json())


def _failed(family: Family, error: str) -> FamilyResult:
    return FamilyResult(
        family.name, family.model_type, family.model_class, family.task, family.curated, ERROR, "process", error
    )


class Sweep:
    """Starts a fork server that has imported :data:`PRELOAD`, then one capped process per family from it."""

    def __init__(self, caps: Caps, log: Path) -> None:
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(list(PRELOAD))
        self.caps, self.log = caps, log
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")

    def check(self, family: Family) -> FamilyResult:
        """The family's row; a process that crashes, runs out of a cap or sends nothing gives an ``error`` row."""
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_in_child, args=(family, sender, self.caps, str(self.log)))
        process.start()
        sender.close()
        try:
            if receiver.poll(self.caps.wall_seconds):
                return FamilyResult.from_json(receiver.recv())
        except EOFError:  # the process ended without a result
            pass
        finally:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            receiver.close()
        code = process.exitcode
        if code == -9 and not process.is_alive():
            reason = f"killed after {self.caps.wall_seconds:g} s of wall-clock time, or for memory"
        elif code == -24:  # SIGXCPU
            reason = f"over {self.caps.cpu_seconds} CPU seconds"
        else:
            reason = f"the process ended with exit code {code} (see the log)"
        return _failed(family, reason)


def run(
    families: Sequence[Family],
    caps: Caps,
    log: Path,
    command: str,
    say: Callable[[str], None] = print,
    budget_seconds: float | None = None,
) -> SweepResults:
    """Every family in its own process, one after the other.

    Past ``budget_seconds`` of wall-clock time no further family starts, except the curated ones (always run in
    full); the rest are listed in the results' ``not_tried``.
    """
    started = time.perf_counter()
    sweep = Sweep(caps, log)
    rows = []
    not_tried: list[str] = []
    for index, family in enumerate(families, start=1):
        if budget_seconds is not None and not family.curated and time.perf_counter() - started > budget_seconds:
            not_tried = [other.name for other in families[index - 1 :]]
            say(f"the budget of {budget_seconds / 60:g} min is spent: {len(not_tried)} families not tried")
            break
        row = sweep.check(family)
        rows.append(row)
        say(
            f"[{index}/{len(families)}] {family.name} ({family.model_class}): {row.status}"
            + (f" at {row.stage}: {row.error[:160]}" if row.error else "")
            + f" ({row.total_seconds:.1f} s)"
        )
    return SweepResults(
        rows=rows,
        command=command,
        machine=machine_info(),
        transformers=importlib.metadata.version("transformers"),
        memory_gb=caps.memory_gb,
        cpu_seconds=sum(row.total_seconds for row in rows),
        total_seconds=time.perf_counter() - started,
        not_tried=not_tried,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sweep; write the JSON and the Markdown section."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hf_families",
        description="Every Hugging Face family that builds from a config: find, plan, prune, check, save and load.",
    )
    parser.add_argument("--families", nargs="+", default=None, help="names (curated) or model types (default: all)")
    parser.add_argument("--curated", action="store_true", help="only the curated families of issue 20")
    parser.add_argument("--limit", type=int, default=None, help="the first N families only")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="wall-clock minutes after which no further family starts (the curated ones always run; default: none)",
    )
    parser.add_argument("--memory-gb", type=float, default=Caps.memory_gb, help="per family (default 4)")
    parser.add_argument("--cpu-seconds", type=int, default=Caps.cpu_seconds, help="per family (default 120)")
    parser.add_argument("--wall-seconds", type=float, default=Caps.wall_seconds, help="per family (default 600)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument(
        "--markdown", type=Path, default=None, help="file for the report section (default: --out with .md)"
    )
    parser.add_argument("--log", type=Path, default=None, help="the families' output (default: --out with .log)")
    parser.add_argument("--report-only", action="store_true", help="re-render the report from --out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what every family's process runs with, and what the machine line says
    markdown = args.markdown or args.out.with_suffix(".md")
    if args.report_only:
        results = SweepResults.from_json(args.out.read_text())
    else:
        families = find(args.families) if args.families else catalogue()
        if args.curated:
            families = [family for family in families if family.curated]
        families = families[: args.limit] if args.limit is not None else families
        caps = Caps(args.memory_gb, args.cpu_seconds, args.wall_seconds)
        log = args.log or args.out.with_suffix(".log")
        budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
        results = run(families, caps, log, command_line("benchmarks.hf_families"), budget_seconds=budget)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(results.to_json())
    write_section(markdown, render_markdown(results), BEGIN, END)
    print(f"wrote {args.out} and {markdown}")
