"""``python -m benchmarks.vit``: see :mod:`benchmarks.vit`."""

from .run import main

main()
