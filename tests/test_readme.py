"""The README's Python snippets that need no data run as they are written."""

from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SNIPPETS = [block.split("```", 1)[0] for block in README.split("```python\n")[1:]]
RUNNABLE = [s for s in SNIPPETS if "model.fit" not in s and "trainer.fit(model, datamodule=dm)" not in s]


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 1


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.splitlines()[0][:40])
def test_readme_snippet_runs(snippet):
    exec(compile(snippet, "README.md", "exec"), {})
