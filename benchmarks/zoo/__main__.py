"""``python -m benchmarks.zoo``: see :mod:`benchmarks.zoo`."""

from .run import main

main()
