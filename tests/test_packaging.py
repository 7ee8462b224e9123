"""The wheel's metadata and the source distribution, as the build backend writes them from a copy of the project."""

import re
import shutil
import tarfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist_info(tmp_path_factory):
    build_meta = pytest.importorskip("setuptools.build_meta")
    project = tmp_path_factory.mktemp("project")
    for name in ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"]:
        shutil.copy(ROOT / name, project)
    shutil.copytree(ROOT / "lightning_actprune", project / "lightning_actprune")
    out = project / "metadata"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)  # the backend builds the current directory
        name = build_meta.prepare_metadata_for_build_wheel(str(out))
    return out / name


def test_wheel_carries_the_license_and_complete_metadata(dist_info):
    metadata = Parser().parsestr((dist_info / "METADATA").read_text())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert (dist_info / "licenses" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    # no URL until the project has a public home: a link to a repository that does not exist misleads (issue 19)
    assert metadata.get_all("Project-URL") is None
    classifiers = metadata.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    python = re.fullmatch(r">=3\.(\d+)", metadata["Requires-Python"])
    assert python is not None
    assert f"Programming Language :: Python :: 3.{python[1]}" in classifiers
    assert "pruning" in metadata["Keywords"].split(",")


def test_changelog_follows_keep_a_changelog_from_the_current_version(dist_info):
    version = Parser().parsestr((dist_info / "METADATA").read_text())["Version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## (\S+)", changelog, flags=re.MULTILINE)
    assert releases[0] == "Unreleased"
    assert version in releases
    assert "0.1.0" in releases
    assert "github.com/lightning-actprune" not in changelog  # no links to a repository that does not exist


def test_the_source_distribution_ships_no_partial_test_tree(tmp_path_factory):
    """Issue 19: tests/test_*.py without the conftest, helpers, examples and benchmarks they import cannot run."""
    build_meta = pytest.importorskip("setuptools.build_meta")
    project = tmp_path_factory.mktemp("sdist")
    for name in ["pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md"]:
        shutil.copy(ROOT / name, project)
    for directory in ["lightning_actprune", "tests"]:
        shutil.copytree(ROOT / directory, project / directory, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        name = build_meta.build_sdist(str(project / "dist"))
    with tarfile.open(project / "dist" / name) as archive:
        names = archive.getnames()
    assert any(n.endswith("lightning_actprune/_callback.py") for n in names)
    assert not [n for n in names if "/tests/" in n]
