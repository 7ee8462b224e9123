"""The residual-channel sweep over timm's transformers: a row per model, exact where a residual layer is found."""

import pytest

from benchmarks.residual.run import MARKERS, ResidualResults, main, measure

pytest.importorskip("timm")


def test_a_vit_loses_a_quarter_of_its_residual_width_exactly():
    row = measure("vit_tiny_patch16_224", img_size=32)
    assert row.width == 192
    assert 0.2 < row.removed_params < 0.26  # nearly every matrix of a ViT has the residual width on one side
    assert row.max_difference < 1e-4
    assert row.reason == ""


def test_a_model_whose_stream_cannot_go_says_why():
    row = measure("mixer_s16_224", img_size=32)  # its token-mixing MLP reads the channels as a batch
    assert row.width == 0
    assert "does not equal zeroing them" in row.reason


def test_the_sweep_writes_its_section_and_json(tmp_path):
    markdown, out = tmp_path / "BENCHMARKS.md", tmp_path / "residual.json"
    markdown.write_text("# Benchmarks\n\nkept\n")
    main(["--models", "vit_tiny_patch16_224", "--threads", "1", "--json", str(out), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert MARKERS[0] in text
    assert "A residual layer in 1 of 1 models" in text
    assert "| vit_tiny_patch16_224 | 5.5M | 192 |" in text
    (row,) = ResidualResults.from_json(out.read_text()).rows
    assert row.width == 192
