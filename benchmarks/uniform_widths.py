"""What ``uniform_widths`` costs: one FFN width per role (loadable by a stock config) against a width per layer.

A small Llama (Hugging Face ``LlamaForCausalLM`` built from a config, bytes as tokens) is trained for a few minutes on
the Python standard library's own source files, then pruned one-shot, exactly as ``ActivationPruning`` prunes with
its defaults for ``target_params_reduction`` (normalised fluctuation, statistics from the validation files), once
with ``uniform_widths=True`` and once without, at the same parameter targets. Reported: test bits per byte, the
parameter reduction reached, and the parameters the stock ``from_pretrained`` builds from what
``lightning_actprune.save_pretrained`` writes (free widths are zero-padded to the widest layer of each config field).

Run from the repository root: ``python -m benchmarks.uniform_widths`` (``--seeds``, ``--steps``, ``--targets``,
``--report-only``). It rewrites the block between the ``uniform_widths:begin``/``end`` markers of BENCHMARKS.md and
caches the numbers in ``benchmarks/.cache/uniform_widths_results.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sysconfig
import tempfile
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import (
    DEFAULT_CACHE,
    DEFAULT_MARKDOWN,
    command_line,
    last_results,
    machine_info,
    mean_spread,
    write_section,
)
from lightning_actprune import save_pretrained
from lightning_actprune._huggingface import uniform_ties
from lightning_actprune.core import (
    ActivationRecorder,
    PruningPlan,
    ThresholdEvaluator,
    apply_plan,
    count_parameters,
    find_prunable_layers,
    plan_for_reduction,
)

BEGIN, END = "<!-- uniform_widths:begin -->", "<!-- uniform_widths:end -->"
RESULTS_FILE = "uniform_widths_results.json"
SEQUENCE = 128


def stdlib_splits(train_bytes: int, eval_bytes: int) -> dict[str, Tensor]:
    """Byte sequences of the standard library's ``.py`` files, split by file (a file is in one split only)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, bytearray] = {"train": bytearray(), "validation": bytearray(), "test": bytearray()}
    limits = {"train": train_bytes, "validation": eval_bytes, "test": eval_bytes}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if "site-packages" in relative:
            continue
        bucket = zlib.crc32(relative.encode()) % 10
        split = "validation" if bucket == 0 else "test" if bucket == 1 else "train"
        if len(splits[split]) < limits[split]:
            splits[split] += path.read_bytes()
        if all(len(splits[s]) >= limits[s] for s in splits):
            break
    tensors = {}
    for split, data in splits.items():
        usable = min(len(data), limits[split]) // SEQUENCE * SEQUENCE
        tensors[split] = torch.tensor(list(data[:usable]), dtype=torch.long).view(-1, SEQUENCE)
    return tensors


def build_llama(seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=SEQUENCE, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train(model: nn.Module, data: Tensor, steps: int, seed: int, batch: int = 32) -> float:
    """AdamW with a cosine schedule; returns the seconds it took."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (batch,), generator=generator)
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: Tensor, batch: int = 64) -> float:
    losses = [model(input_ids=data[i : i + batch], labels=data[i : i + batch]).loss for i in range(0, len(data), batch)]
    return float(torch.stack(losses).mean()) / math.log(2)


@dataclasses.dataclass
class Row:
    seed: int
    target: float
    uniform: bool
    reduction: float
    bits_per_byte: float
    widths: list[int]
    stock_parameters: int  # what the stock from_pretrained builds from lightning_actprune.save_pretrained's output
    parameters: int


def prune(model: nn.Module, validation: Tensor, target: float, uniform: bool) -> tuple[nn.Module, PruningPlan]:
    """``ActivationPruning(target_params_reduction=target, uniform_widths=uniform)``'s steps, on a copy."""
    model = copy.deepcopy(model)
    with ActivationRecorder(model) as recorder, torch.no_grad():
        for i in range(0, len(validation), 64):
            model(input_ids=validation[i : i + 64])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # FFN neurons only, as the published numbers were measured (heads are measured by benchmarks.lm)
        layers = find_prunable_layers(model, {"": ((), {"input_ids": validation[:8]})}, prune_heads=False)
    tied = uniform_ties(model, layers) if uniform else ()
    evaluator = ThresholdEvaluator(model, layers, recorder.moments(), "fluctuation", 1, normalize=True, tied=tied)
    choice = plan_for_reduction(evaluator, target)
    if choice.plan is None:
        raise SystemExit(f"the target {target} is out of reach: {choice.note}")
    apply_plan(model, choice.plan)
    return model, choice.plan


def stock_parameters(pruned: nn.Module, plan: PruningPlan) -> int:
    """The parameters of what the stock ``from_pretrained`` loads from ``lightning_actprune.save_pretrained``."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(pruned, directory, plan=plan)
        return count_parameters(AutoModelForCausalLM.from_pretrained(directory))


def measure(
    seeds: Sequence[int], steps: int, targets: Sequence[float], train_bytes: int, eval_bytes: int = SEQUENCE * 512
) -> dict:
    data = stdlib_splits(train_bytes, eval_bytes)
    rows, trained = [], []
    for seed in seeds:
        model = build_llama(seed)
        seconds = train(model, data["train"], steps, seed)
        before = bits_per_byte(model, data["test"])
        parameters = count_parameters(model)
        trained.append({"seed": seed, "seconds": seconds, "bits_per_byte": before, "parameters": parameters})
        print(f"seed {seed}: trained {steps} steps in {seconds:.0f} s, {before:.4f} bits/byte", flush=True)
        for target in targets:
            for uniform in (True, False):
                pruned, plan = prune(model, data["validation"], target, uniform)
                row = Row(
                    seed=seed,
                    target=target,
                    uniform=uniform,
                    reduction=1 - count_parameters(pruned) / parameters,
                    bits_per_byte=bits_per_byte(pruned, data["test"]),
                    widths=[len(layer.kept) for layer in plan.layers],
                    stock_parameters=stock_parameters(pruned, plan),
                    parameters=count_parameters(pruned),
                )
                rows.append(dataclasses.asdict(row))
                print(
                    f"  -{target:.0%} uniform={uniform!s:5} {row.bits_per_byte:.4f} bits/byte {row.widths}", flush=True
                )
    sizes = {split: int(tensor.numel()) for split, tensor in data.items()}
    return {"trained": trained, "rows": rows, "bytes": sizes, "steps": steps, "seeds": list(seeds)}


def render(results: dict, command: str, minutes: float, machine: str) -> str:
    trained, rows = results["trained"], results["rows"]
    full = trained[0]["parameters"]
    lines = [
        f"_Generated by `{command}` in {minutes:.1f} min. Machine: {machine}._",
        "",
        f"Llama, 4 blocks, 96 wide, FFN 384, 4 heads, byte vocabulary ({full:,} parameters), trained"
        f" {results['steps']} steps of 32 × {SEQUENCE} bytes (AdamW, one-cycle lr 3e-3) on the standard library's"
        f" `.py` files ({results['bytes']['train']:,} bytes; {results['bytes']['validation']:,} validation bytes for"
        f" the statistics, {results['bytes']['test']:,} test bytes, other files); seeds {results['seeds']}."
        f" Unpruned: {mean_spread([t['bits_per_byte'] for t in trained], 3)} bits/byte on the test bytes. Each row"
        " prunes the same trained models one-shot to the target (normalised fluctuation, the default of"
        " `target_params_reduction`); mean ± standard deviation over the seeds.",
        "",
        "| target | bits/byte, uniform | bits/byte, free | uniform − free (paired) | per seed"
        " | reduction reached (uniform / free) | stock `from_pretrained` loads (uniform / free, zero-padded)"
        " | FFN widths, seed "
        f"{results['seeds'][0]} (uniform / free) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for target in sorted({row["target"] for row in rows}):
        of = {u: [r for r in rows if r["target"] == target and r["uniform"] is u] for u in (True, False)}
        paired = [u["bits_per_byte"] - f["bits_per_byte"] for u, f in zip(of[True], of[False], strict=True)]
        reached = " / ".join(mean_spread([r["reduction"] * 100 for r in of[u]], 1) + "%" for u in of)
        loaded = " / ".join(
            mean_spread([r["stock_parameters"] / full * 100 for r in of[u]], 1) + "%" for u in (True, False)
        )
        widths = " / ".join(str(of[u][0]["widths"]) for u in (True, False))
        lines.append(
            f"| −{target:.0%} | {mean_spread([r['bits_per_byte'] for r in of[True]], 3)}"
            f" | {mean_spread([r['bits_per_byte'] for r in of[False]], 3)} | {mean_spread(paired, 3)}"
            f" | {', '.join(f'{d:+.3f}' for d in paired)} | {reached} | {loaded}"
            f" | {widths} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400, help="training steps per seed")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    parser.add_argument("--train-bytes", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN)
    parser.add_argument("--report-only", action="store_true", help="re-render the last run's JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache_dir / RESULTS_FILE
    if args.report_only:
        saved = json.loads(last_results(cache))
    else:
        start = time.perf_counter()
        results = measure(args.seeds, args.steps, args.targets, args.train_bytes)
        machine = machine_info().describe()
        saved = {
            "results": results,
            "command": command_line("benchmarks.uniform_widths", argv),
            "minutes": (time.perf_counter() - start) / 60,
            "machine": machine,
        }
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(saved, indent=1))
    report = render(saved["results"], saved["command"], saved["minutes"], saved["machine"])
    write_section(args.markdown, report, BEGIN, END)
    print(report)


if __name__ == "__main__":
    main()
