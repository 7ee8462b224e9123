"""``python -m benchmarks.cost``: see :mod:`benchmarks.cost`."""

from .run import main

main()
