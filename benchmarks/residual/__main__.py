"""``python -m benchmarks.residual``: see :mod:`benchmarks.residual`."""

from .run import main

main()
