"""The one exception class of the package."""


class ActivationPruningError(ValueError):
    """Raised for bad arguments and for models or data that cannot be pruned safely."""
