"""The CI subset of the Hugging Face families table (``benchmarks/hf_families``), checked by the benchmark's own code.

A handful of families chosen for their layouts: grouped-query attention (Llama), fused q/k/v and gate/up (Phi-3), a
fused q/k/v whose axis also holds the key/value head (Falcon, multi-query), an encoder-decoder with a relative
position bias (T5), one layer shared by every block (ALBERT), and a family built from its default config shrunk
(GPT-2, as the sweep builds every ``model_type`` that issue 20 does not name). Each goes through
:func:`benchmarks.hf_families.check.check`, the function every row of the table comes from: find, the plan for
``target_params_reduction=0.3``, the surgery, the zeroing oracle, ``save_pretrained`` → the stock and our
``from_pretrained``, ``uniform_widths`` with the model's own ``save_pretrained``, ``generate`` with and without the
cache.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from benchmarks.common import machine_info
from benchmarks.hf_families.check import RTOL, check, compare
from benchmarks.hf_families.families import Family, curated_family, family_of
from benchmarks.hf_families.report import render_markdown
from benchmarks.hf_families.results import (
    CLOSE,
    DIFFERS,
    EXACT,
    PRUNED,
    SKIPPED,
    FamilyResult,
    SweepResults,
)
from benchmarks.hf_families.run import Caps, run

transformers = pytest.importorskip("transformers")

CI_FAMILIES = {
    # name: whether its config states every width once they are uniform (else its head counts stay unstated: the
    # config derives head_dim from the hidden size and the head count)
    "llama": True,
    "phi3": True,
    "falcon_multi_query": False,
    "t5": True,
    "albert": False,
    "gpt2": False,
}


def family(name: str) -> Family:
    if name in CI_FAMILIES and name != "gpt2":
        return curated_family(name)
    found = family_of(name)
    if found is None:
        pytest.skip(f"this transformers has no model type {name!r}")
    return found


@functools.cache
def checked(name: str) -> FamilyResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return check(family(name))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CI_FAMILIES))
def test_the_family_prunes_heads_and_ffn_neurons_like_the_oracle_and_round_trips(name):
    row = checked(name)

    assert row.status == PRUNED, (row.stage, row.error)
    assert row.error == ""
    assert row.stage == "done"
    assert row.reduction >= row.target == 0.3
    assert row.ffn_pruned > 0
    assert row.head_layers > 0
    assert row.heads_pruned > 0  # heads are chosen with the FFN neurons under one target
    assert row.oracle.equal, row.oracle
    assert row.stock_load.equal, row.stock_load  # ours save_pretrained -> the stock from_pretrained
    assert row.ours_load.equal, row.ours_load  # -> ours, at the pruned size
    if CI_FAMILIES[name]:
        assert row.uniform_unstated == []
        assert row.uniform_load.equal, row.uniform_load  # the model's own save_pretrained -> the stock loader
    else:
        assert any("cannot state the widths" in text for text in row.uniform_unstated), row.uniform_unstated
        assert not row.uniform_load.equal
    if family(name).generates:
        assert row.generate.outcome == EXACT, row.generate  # with the cache = without = the zeroing oracle
    assert row.analysis_seconds > 0


def test_a_config_that_refuses_a_global_read_of_a_per_layer_field_is_pruned_and_round_trips():
    # transformers' per-layer configs raise a RuntimeError on `config.num_key_value_heads`: the head counts come from
    # the attention modules, the config fields that cannot be read are left alone
    row = checked("embedding_gemma2_text")

    assert (row.status, row.stage, row.error) == (PRUNED, "done", "")
    assert row.heads_pruned > 0
    assert row.ffn_pruned > 0
    assert row.oracle.equal, row.oracle
    assert row.stock_load.equal, row.stock_load
    assert row.ours_load.equal, row.ours_load
    assert any("cannot state the widths" in text for text in row.uniform_unstated), row.uniform_unstated


def test_the_comparison_tells_exact_from_rounding_from_a_difference():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert compare(x, x.clone()).outcome == EXACT
    assert compare(x * (1 + RTOL / 10), x).outcome == CLOSE
    assert compare(x + 1, x).outcome == DIFFERS
    assert compare(x[:2], x).outcome == DIFFERS
    assert compare(torch.tensor([1, 2]), torch.tensor([1, 3])).outcome == DIFFERS


def test_the_report_counts_the_rows_and_lists_what_was_not_tried():
    rows = [checked(name) for name in CI_FAMILIES]
    results = SweepResults(
        rows=rows,
        command="python -m benchmarks.hf_families",
        machine=machine_info(),
        transformers=transformers.__version__,
        memory_gb=4.0,
        cpu_seconds=sum(row.total_seconds for row in rows),
        total_seconds=1.0,
        not_tried=["zamba"],
    )
    assert SweepResults.from_json(results.to_json()) == results

    text = render_markdown(results)

    assert f"**{len(rows)} families tried** (5 with hand-written tiny configs, 1 from their default config" in text
    assert f"**{len(rows)} pruned**" in text
    assert "1 more not tried: the run's wall-clock budget was spent first." in text
    assert "heads pruned at the target in 5 of 5, FFN neurons in 5" in text
    for name in CI_FAMILIES:
        assert f"\n| {name} | `" in text


@pytest.mark.slow
def test_the_sweep_runs_each_family_in_a_capped_process_of_its_own(tmp_path, monkeypatch):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "PYTHONPATH"):
        monkeypatch.setenv(variable, "")  # the sweep sets them for its processes: restored after the test
    missing = Family("no_such_family", "no_such_family", "NoSuchModel", "AutoModel", "base", curated=False)
    lines: list[str] = []

    results = run([curated_family("llama"), missing], Caps(), tmp_path / "log", "the command", lines.append)

    llama, skipped = results.rows
    assert (llama.status, llama.stage, llama.ours_load.outcome, llama.generate.outcome) == (
        PRUNED,
        "done",
        EXACT,
        EXACT,
    )
    assert (skipped.status, skipped.stage) == (SKIPPED, "build")
    assert "no_such_family" in skipped.error
    assert lines[0].startswith("[1/2] llama (LlamaForCausalLM): pruned")
    assert "==== llama (LlamaForCausalLM) ====" in (tmp_path / "log").read_text()
    assert json.loads(results.to_json())["rows"][0]["name"] == "llama"

    budget = run([family("gpt2")], Caps(), tmp_path / "log", "the command", lines.append, budget_seconds=0)

    assert budget.rows == []
    assert budget.not_tried == ["gpt2"]


def test_every_curated_config_is_the_model_type_it_names():
    """Each hand-written tiny config builds and is of its family's model type (a renamed class name fails here)."""
    pytest.importorskip("transformers")
    from benchmarks.hf_families.families import CURATED

    for name, tiny in CURATED.items():
        assert tiny.config().model_type == tiny.model_type, name
