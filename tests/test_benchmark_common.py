"""benchmarks.common: the records' JSON (flat, nested, older shapes), and the rule that benchmarks import only it."""

import ast
import dataclasses
import doctest
import json
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks.common import FlatJsonRecord, JsonRecord, Machine, from_plain, machine_info

BENCHMARKS = Path(common.__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    pair: tuple[str, float]
    latency: dict[int, float]


@dataclasses.dataclass
class Measured:
    config: Config
    rows: list[Config]
    best: Config | None = None


@dataclasses.dataclass
class Where:
    machine: Machine
    command: str


@dataclasses.dataclass
class Run(FlatJsonRecord):
    measured: Measured
    where: Where


def test_helpers_doctests():
    for module in (common.command, common.markdown, common.records):
        assert doctest.testmod(module).failed == 0


def test_a_flat_record_is_one_object_of_its_records_fields_and_reads_back_with_their_types():
    config = Config((3, 4), ("a", 0.5), {1: 0.25, 256: 3.0})
    run = Run(Measured(config, [config, config]), Where(machine_info(), "python -m x"))
    data = json.loads(run.to_json())
    assert list(data) == ["config", "rows", "best", "machine", "command"]
    assert data == json.loads(json.dumps(dataclasses.asdict(run.measured) | dataclasses.asdict(run.where)))
    again = Run.from_json(run.to_json())
    assert again == run
    assert again.measured.config.latency == {1: 0.25, 256: 3.0}  # int keys, as JSON cannot keep them
    assert again.measured.config.sizes == (3, 4)


def test_a_machine_recorded_before_versions_reads_back_with_them():
    older = {
        "cpu": "a CPU", "cores": 4, "usable_cores": 2, "torch_threads": 1, "python": "3.11.7",
        "torch": "2.14.1+cpu", "lightning": "2.6.6", "torch_pruning": "1.6.1", "platform": "Linux",
    }  # fmt: skip
    machine = from_plain(Machine, older)
    assert machine.versions == {"torch": "2.14.1+cpu", "lightning": "2.6.6", "torch-pruning": "1.6.1"}
    assert (machine.cpu, machine.usable_cores, machine.torch_threads) == ("a CPU", 2, 1)
    current = machine_info()
    assert from_plain(Machine, dataclasses.asdict(current)) == current


def test_a_plain_record_round_trips():
    @dataclasses.dataclass
    class Rows(JsonRecord):
        machine: Machine
        values: list[float]

    rows = Rows(machine_info(), [0.1, 1 / 3])
    assert Rows.from_json(rows.to_json()) == rows


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, relative imports resolved."""
    package = path.relative_to(BENCHMARKS.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _own_package(path: Path) -> str:
    """``benchmarks.<name>`` of a benchmark's module (a subpackage, or a module of its own)."""
    return ".".join(path.relative_to(BENCHMARKS.parent).with_suffix("").parts[:2])


SOURCES = sorted(
    path
    for path in BENCHMARKS.rglob("*.py")
    if not any(part.startswith(".") for part in path.relative_to(BENCHMARKS).parts)
)
"""The benchmarks' modules; not what runs leave under ``benchmarks/.cache`` (the cost run's baseline checkout)."""


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(BENCHMARKS.parent)))
def test_a_benchmark_imports_no_other_benchmark_and_no_private_name_of_another_package(path):
    own = _own_package(path)
    for module, names in _imports(path):
        inside = module == own or module.startswith(own + ".")
        if module.startswith("benchmarks.") and not inside:
            assert module.split(".")[1] == "common", f"{path.name} imports {module}"
        if not inside:
            private = [name for name in names if name.startswith("_") and name != "__future__"]
            assert not private, f"{path.name} imports {private} from {module}"
