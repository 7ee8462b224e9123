"""BatchNorm recalibration: re-estimate running statistics after pruning, from forward passes alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """Every BatchNorm layer of ``model`` that tracks running statistics, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


@contextmanager
def recalibrating_batchnorm(model: nn.Module) -> Iterator[list[str]]:
    """Re-estimate the running mean and variance of every BatchNorm layer from the forward passes made inside.

    After pruning, the layers before a BatchNorm produce different activations, and its running statistics,
    estimated during training on the unpruned network, no longer match them: a pruned BatchNorm network often
    collapses in eval mode for that reason alone. Inside this context every BatchNorm layer normalises with the
    statistics of the batch it sees and accumulates a plain average of them (``momentum=None``), starting from
    zero, whatever mode the rest of the model is in (dropout stays as the caller set it, e.g. off in eval mode);
    no parameter changes. Run forward passes under ``torch.no_grad()`` inside it.

    The new statistics are written into fresh tensors: the old ones are left untouched (a snapshot that holds
    them can restore them). On exit the momentum and the mode of each layer are restored, and a layer that saw
    no batch inside (a branch the passes did not take) gets its old statistics back.

    Args:
        model: the model whose BatchNorm layers to recalibrate.

    Yields:
        The names of the recalibrated layers (empty when the model has none).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()).eval()
        >>> with recalibrating_batchnorm(net) as names, torch.no_grad():
        ...     _ = net(torch.randn(64, 4) * 3 + 1)
        >>> names, bool(net[1].running_var.mean() > 1)
        (['1'], True)
    """
    layers = batchnorm_layers(model)
    saved: list[tuple[_BatchNorm, float | None, bool, dict[str, Any]]] = []
    hooks = []

    def train_mode(module: nn.Module, _: Any) -> None:
        module.training = True

    for module in layers.values():
        saved.append((module, module.momentum, module.training, dict(module._buffers)))
        # fresh tensors, never in-place updates of the old ones
        module.running_mean = torch.zeros_like(module.running_mean)  # type: ignore[arg-type]
        module.running_var = torch.ones_like(module.running_var)  # type: ignore[arg-type]
        module.num_batches_tracked = torch.zeros_like(module.num_batches_tracked)  # type: ignore[arg-type]
        module.momentum = None
        hooks.append(module.register_forward_pre_hook(train_mode))
    try:
        yield list(layers)
    finally:
        for hook in hooks:
            hook.remove()
        for module, momentum, training, buffers in saved:
            module.momentum = momentum
            module.training = training
            if not int(module.num_batches_tracked):  # type: ignore[arg-type]
                module._buffers.update(buffers)
