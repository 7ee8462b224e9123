"""``python -m benchmarks.recovery``: see :mod:`benchmarks.recovery`."""

from .run import main

main()
