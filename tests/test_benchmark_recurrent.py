"""benchmarks.recurrent: one short run end to end (a GRU, one seed, one epoch before the prune), and its table."""

import json
import logging

import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks.recurrent.run import RESULTS_FILE, Run, main, render_markdown


@pytest.fixture
def _command_line_side_effects():
    """The command line quiets Lightning's logger and sets the thread count: put both back for the other tests."""
    logger, threads = logging.getLogger("lightning.pytorch"), torch.get_num_threads()
    level = logger.level
    yield
    logger.setLevel(level)
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_command_line_side_effects")
def test_one_short_run_prunes_the_recurrent_units_and_writes_its_results(tmp_path, capsys):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nkept text\n")
    main(["--epochs", "1", "--seeds", "0", "--kinds", "GRU", "--cache-dir", str(tmp_path), "--markdown", str(markdown)])
    (run,) = json.loads((tmp_path / RESULTS_FILE).read_text())["runs"]
    assert run["kind"] == "GRU"
    assert 1 - run["params_after"] / run["params"] >= 0.3
    before, after = (int(n) for n in run["widths"]["net.rnn"].split("→"))
    assert after < before == 128
    assert run["prunable_fraction"] > 0.99
    printed = capsys.readouterr().out
    assert "| GRU | 76,362 | 99.9% |" in printed
    assert "Seeds 0: mean ± standard deviation" in printed
    written = markdown.read_text()
    assert written.startswith("# Benchmarks\n\nkept text\n")
    assert "<!-- recurrent:begin -->\n### LSTM and GRU" in written
    assert "| GRU | 76,362 | 99.9% |" in written.split("<!-- recurrent:begin -->")[1]


def test_the_table_gives_mean_and_spread_over_seeds():
    runs = [
        Run("LSTM", seed, 1000, 0.99, 0.1, 700, {"net.rnn": "8→6"}, 0.9 + seed / 100, 0.8, 0.85) for seed in range(3)
    ]
    header = {"command": "python -m benchmarks.recurrent", "minutes": 1.0, "machine": "a CPU", "epochs": 15,
              "lr": 0.003, "seeds": "0, 1, 2"}  # fmt: skip
    text = render_markdown(runs, header)
    assert "| LSTM | 1,000 | 99.0% | 30.0 ± 0.0% | 91.0 ± 0.8 | 80.0 ± 0.0 | 85.0 ± 0.0 |" in text
    assert "- LSTM, seed 2: net.rnn 8→6" in text
