"""``python -m benchmarks.recurrent``: see :mod:`benchmarks.recurrent.run`."""

from .run import main

main()
