"""Benchmarks of ActivationPruning; each one is a subpackage run with ``python -m benchmarks.<name>``.

Not part of the installed wheel: run them from a checkout of the repository.
"""
