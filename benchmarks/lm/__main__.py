"""``python -m benchmarks.lm``: see :mod:`benchmarks.lm`."""

from .run import main

main()
