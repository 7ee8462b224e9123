"""``python -m benchmarks.fashion_mnist``: see :mod:`benchmarks.fashion_mnist`."""

from .run import main

main()
