"""Where a benchmark ran: the CPU, the cores it could use, the torch threads and the library versions."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LIBRARIES = ("torch", "lightning", "torch-pruning", "transformers")


@dataclasses.dataclass
class Machine:
    """CPU model, cores, torch threads and the versions of the libraries that matter (``None``: not installed)."""

    cpu: str
    cores: int | None
    usable_cores: int | None
    torch_threads: int
    python: str
    platform: str
    versions: dict[str, str | None]

    @classmethod
    def from_older(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The JSON data of a record written before ``versions``, with ``torch``, ``lightning``, ``torch_pruning``."""
        if "versions" in data:
            return data
        older = {"torch": "torch", "lightning": "lightning", "torch_pruning": "torch-pruning"}
        return {**data, "versions": {name: data.get(key) for key, name in older.items()}}

    def describe(self) -> str:
        """One line for a report: ``"<cpu>, 2 usable cores, 2 torch threads, torch 2.x, …, Python 3.11"``."""
        threads = f"{self.torch_threads} torch thread{'' if self.torch_threads == 1 else 's'}"
        versions = ", ".join(f"{name} {version}" for name, version in self.versions.items() if version is not None)
        return f"{self.cpu}, {self.usable_cores} usable cores, {threads}, {versions}, Python {self.python}"


def _version(distribution: str) -> str | None:
    if distribution == "torch":
        return torch.__version__  # the build's own version keeps its local tag (``+cu130``); the metadata's may not
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(libraries: Sequence[str] = LIBRARIES) -> Machine:
    """The machine this process runs on, with the versions of ``libraries`` (distribution names)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count(),
        usable_cores=usable,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        platform=platform.platform(),
        versions={name: _version(name) for name in libraries},
    )
