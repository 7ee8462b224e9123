"""`.ci/clean`: CI fails when a step leaves files in the checkout (issue 19)."""

import shutil
import subprocess

import pytest

from tests.helpers import ROOT


@pytest.fixture
def checkout(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "clean", tmp_path / ".ci" / "clean")
    (tmp_path / ".gitignore").write_text(".venv/\n__pycache__/\nlightning_logs/\n/runs/\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("y = 2\n")
    for command in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "0"]):
        subprocess.run(["git", *command], cwd=tmp_path, check=True)
    (tmp_path / ".venv").mkdir()  # the environments and caches are allowed
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "m.pyc").write_text("")
    return tmp_path


def clean(checkout, *allowed):
    return subprocess.run([".ci/clean", "a step", *allowed], cwd=checkout, capture_output=True, text=True)


def test_a_clean_checkout_passes(checkout):
    assert clean(checkout).returncode == 0


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("pruned.ckpt", "?? pruned.ckpt"),
        ("lightning_logs/version_0/x", "!! lightning_logs/"),
        ("code.py", " M code.py"),
    ],
    ids=["untracked", "ignored_output", "modified"],
)
def test_files_a_step_leaves_fail_the_run_and_are_named(checkout, path, shown):
    target = checkout / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("left behind\n")
    result = clean(checkout)
    assert result.returncode == 1
    assert "a step left files in the checkout" in result.stderr
    assert shown in result.stderr


def test_the_paths_a_step_may_write_are_allowed(checkout):
    (checkout / "runs" / "digits").mkdir(parents=True)
    (checkout / "runs" / "digits" / "metrics.csv").write_text("")
    assert clean(checkout).returncode == 1
    assert clean(checkout, "runs").returncode == 0
