"""The README's Python snippets that need no data run as they are written."""

import ast
import builtins
import tempfile

import pytest

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
SNIPPETS = [block.split("```", 1)[0] for block in README.split("```python\n")[1:]]
RUNNABLE = [s for s in SNIPPETS if "model.fit" not in s and "trainer.fit(model, datamodule=dm)" not in s]


def undefined_names(snippet: str) -> set[str]:
    """Names the snippet reads but neither assigns, imports, defines nor gets from Python's builtins."""
    nodes = list(ast.walk(ast.parse(snippet)))
    loaded = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {n.id for n in nodes if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    bound |= {
        (a.asname or a.name).split(".")[0] for n in nodes if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names
    }
    bound |= {n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    bound |= {n.arg for n in nodes if isinstance(n, ast.arg)}
    return loaded - bound - set(dir(builtins))


def test_readme_has_runnable_snippets():
    assert len(RUNNABLE) >= 1
    # every snippet runs but those that use a model and datamodule the README leaves to the reader
    skipped = [s for s in SNIPPETS if s not in RUNNABLE]
    assert len(RUNNABLE) == len(SNIPPETS) - len(skipped) >= 2
    assert all({"model", "dm"} <= undefined_names(s) for s in skipped), skipped
    assert [undefined_names(s) for s in RUNNABLE] == [set()] * len(RUNNABLE)
    ran = "".join(RUNNABLE)
    for name in ("ActivationPruning", "apply_plan", "plan_pruning", "export_pruned", "load_pruned"):
        assert f"{name}(" in ran, f"no runnable README snippet calls {name}"


@pytest.mark.parametrize("snippet", RUNNABLE, ids=lambda s: s.splitlines()[0][:40])
def test_readme_snippet_runs(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes lands in this test's directory,
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its `tempfile.mkdtemp()` included
    exec(compile(snippet, "README.md", "exec"), {})
