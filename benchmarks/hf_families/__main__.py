"""``python -m benchmarks.hf_families``: see :mod:`benchmarks.hf_families`."""

from .run import main

main()
