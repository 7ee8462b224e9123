"""Pieces every benchmark needs: typed records as JSON, Markdown tables and sections, the command, the machine.

- :mod:`.records`: :class:`~.records.JsonRecord` (a dataclass mixin: ``to_json``/``from_json``) and
  :func:`~.records.from_plain`, which rebuilds nested dataclasses from JSON data;
- :mod:`.markdown`: :func:`~.markdown.markdown_table` (pipes in cells escaped, columns aligned by a spec),
  :func:`~.markdown.write_section` (the text between two markers of a file, the rest kept) and
  :func:`~.markdown.mean_spread` (``mean ± spread`` over seeds);
- :mod:`.command`: :func:`~.command.command_line`, the command that ran a benchmark, quoted so it can be pasted;
- :mod:`.machine`: :class:`~.machine.Machine` and :func:`~.machine.machine_info` (CPU, cores, versions, threads).
"""

from .command import command_line
from .machine import Machine, machine_info
from .markdown import markdown_table, mean_spread, write_section
from .records import JsonRecord, from_plain

__all__ = [
    "JsonRecord",
    "Machine",
    "command_line",
    "from_plain",
    "machine_info",
    "markdown_table",
    "mean_spread",
    "write_section",
]
