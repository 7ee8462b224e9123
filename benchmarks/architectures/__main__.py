"""``python -m benchmarks.architectures``: see :mod:`benchmarks.architectures`."""

from .run import main

main()
