"""Fixtures shared by the test modules; the plain models, data and helpers they use are in ``tests/helpers.py``."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from tests.helpers import quiet_trainer


@pytest.fixture
def make_trainer(tmp_path: Path) -> Callable[..., pl.Trainer]:
    """``make_trainer(*callbacks, **trainer_kwargs)``: a quiet CPU Trainer writing under this test's ``tmp_path``."""

    def make(*callbacks: pl.Callback, **kwargs: Any) -> pl.Trainer:
        return quiet_trainer(tmp_path, *callbacks, **kwargs)

    return make
