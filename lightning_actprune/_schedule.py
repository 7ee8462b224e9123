"""Gradual pruning: how much of the original model is gone after each prune, and at the end of which epochs."""

from __future__ import annotations


def cubic_reductions(target: float, steps: int) -> list[float]:
    """The cumulative parameter reduction after each of ``steps`` prunes, cubic as in Zhu & Gupta (2017).

    After prune ``k`` of ``S`` the reduction is ``target * (1 - (1 - k / S) ** 3)``, a fraction of the *original*
    model: the early prunes remove the most, while the model still has redundant neurons, and the last ones little.

    Example:
        >>> [round(r, 4) for r in cubic_reductions(0.9, 2)]
        [0.7875, 0.9]
    """
    return [target * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def prune_epochs(max_epochs: int, recovery_epochs: int, steps: int) -> list[int]:
    """The epochs (0-based) at whose end the ``steps`` prunes happen, evenly spaced over the recovery epochs.

    The first is the epoch of the one-shot prune, ``max_epochs - recovery_epochs - 1``; the next follow every
    ``recovery_epochs // steps`` epochs, so each prune is followed by at least that many epochs of training.

    Example:
        >>> prune_epochs(10, 4, 2)
        [5, 7]
    """
    first = max_epochs - recovery_epochs - 1
    spacing = recovery_epochs // steps
    return [first + k * spacing for k in range(steps)]


def step_reduction(target_of_original: float, params_original: int, params_now: int) -> float:
    """The fraction of the current model to remove so that ``target_of_original`` of the original is gone.

    Example:
        >>> step_reduction(0.75, 1000, 500)
        0.5
    """
    return 1 - params_original * (1 - target_of_original) / params_now
