"""The public surface: a short top-level list for Lightning users, the building blocks in a Lightning-free module."""

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_actprune
import lightning_actprune.core

PACKAGE_DIR = Path(lightning_actprune.__file__).resolve().parent


def test_top_level_lists_what_a_lightning_user_needs():
    assert len(lightning_actprune.__all__) <= 14
    assert {"ActivationPruning", "PruningResult", "load_pruned", "export_pruned"} <= set(lightning_actprune.__all__)
    internals = {"ModuleSnapshot", "ModuleSlice", "pool_moments", "format_sweep_table", "plot_sweep", "SweepRow"}
    assert not internals & (set(lightning_actprune.__all__) | set(lightning_actprune.core.__all__))


@pytest.mark.parametrize("module", [lightning_actprune, lightning_actprune.core], ids=lambda module: module.__name__)
def test_every_public_name_resolves_and_is_documented(module):
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            # `__doc__` itself, not `inspect.getdoc`, which would inherit a base class's docstring
            assert value.__doc__, f"{module.__name__}.{name} has no docstring"
            assert not value.__doc__.startswith(f"{name}("), f"{name} has only the generated NamedTuple docstring"
        else:  # a constant: documented in its module's docstring
            assert f":data:`{name}`" in module.__doc__, f"{module.__name__}.{name} is not documented"


def test_names_that_left_the_top_level_still_resolve_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"lightning_actprune\.apply_plan.*`lightning_actprune\.core`"):
        apply_plan = lightning_actprune.apply_plan
    assert apply_plan is lightning_actprune.core.apply_plan
    with pytest.warns(DeprecationWarning, match="internal"):
        assert lightning_actprune.pool_moments.__name__ == "pool_moments"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = lightning_actprune.not_a_name


def test_core_imports_without_lightning():
    # The package's __init__ imports the callback, so the package is stood in for by an empty module with the same
    # path: only core.py and what it imports run, while any import of Lightning raises.
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys, types

        class NoLightning(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    raise ImportError(f"core imported {{name}}")

        sys.meta_path.insert(0, NoLightning())
        package = types.ModuleType("lightning_actprune")
        package.__path__ = [{str(PACKAGE_DIR)!r}]
        sys.modules["lightning_actprune"] = package
        import lightning_actprune.core

        assert "lightning_actprune._callback" not in sys.modules
        print(len(lightning_actprune.core.__all__))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(lightning_actprune.core.__all__))
