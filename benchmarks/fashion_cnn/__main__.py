"""``python -m benchmarks.fashion_cnn``: see :mod:`benchmarks.fashion_cnn`."""

from .run import main

main()
