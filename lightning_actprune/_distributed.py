"""Several processes, one pruning: which strategies run, exact sharding, and agreement across ranks.

Under DDP every rank sees a shard of the validation data; the statistics are summed across ranks by
torchmetrics (``dist_reduce_fx="sum"``), so every rank can plan alone, and must plan the same. Nothing here
reduces by hand: the data is sharded with Lightning's samplers, the statistics are synced by torchmetrics, and
the checks only compare fingerprints with the strategy's ``all_gather``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import lightning.pytorch.strategies as strategies
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._recalibration import batchnorm_layers
from lightning_actprune._statistics import ActivationMoments, ActivationRecorder

# Strategies that shard parameters (ModelParallelStrategy is new in Lightning 2.4; DeepSpeed's class imports without
# deepspeed installed).
_SHARDED = tuple(
    getattr(strategies, name)
    for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
    if hasattr(strategies, name)
)
# A datamodule's own batch hooks only run when `trainer.validate` is given the datamodule itself.
_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def check_strategy(strategy: Strategy) -> None:
    """Refuse, before training, the strategies under which pruning cannot work.

    Raises:
        ActivationPruningError: spawned or forked workers (``ddp_spawn``, ``ddp_notebook``, XLA), or a strategy
            that shards the parameters (FSDP, DeepSpeed, ``ModelParallelStrategy``).
    """
    name = type(strategy).__name__
    if compat.launches_processes(strategy):
        raise ActivationPruningError(
            f"ActivationPruning does not support `strategy={name}` with spawned"
            " processes: the pruned model would stay in the worker processes. Use `strategy='ddp'`."
        )
    if isinstance(strategy, _SHARDED):
        raise ActivationPruningError(
            f"ActivationPruning does not support `strategy={name}`: it shards the parameters across processes,"
            " and a layer that loses neurons cannot be re-sharded in place. Use `strategy='ddp'` (or one device)"
            " if the model fits on one device; otherwise train with this strategy, consolidate the checkpoint and"
            " prune the full model with ActivationRecorder, find_prunable_layers, plan_pruning and apply_plan."
        )


def is_distributed(trainer: pl.Trainer) -> bool:
    """Whether several processes take part; raises if they do but cannot talk to each other any more."""
    if trainer.world_size == 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ActivationPruningError(
            f"ActivationPruning runs on {trainer.world_size} processes, but the process group is gone: the"
            " statistics of the ranks cannot be summed."
        )
    return True


def unrepeated_val_dataloaders(trainer: pl.Trainer, source: Any) -> Any | None:
    """The fit's validation loaders, each rank getting a disjoint shard that together cover every sample once.

    Lightning's ``DistributedSampler`` pads the shards to equal length by repeating samples, which would count
    them twice in the statistics. ``UnrepeatedDistributedSamplerWrapper`` gives ranks shards of ``n // world``
    or ``n // world + 1`` samples instead (possibly one batch more on some ranks; validation has no per-batch
    collective, unless ``validation_step`` logs with ``on_step=True, sync_dist=True`` or gathers by itself).

    Args:
        trainer: the Trainer.
        source: where the fit's validation data comes from (Lightning's ``_DataLoaderSource``).

    Returns:
        The loaders to give ``trainer.validate``, or ``None`` to leave the data to Lightning: one process; a
        datamodule with its own batch hooks (they would be skipped without the datamodule); or no loader
        that Lightning would shard.
    """
    if not is_distributed(trainer):
        return None
    instance = source.instance
    if isinstance(instance, pl.LightningDataModule) and any(is_overridden(h, instance) for h in _BATCH_HOOKS):
        return None
    loaders = compat.request_dataloader(source)
    replaced: list[DataLoader] = []

    def unrepeated(loader: DataLoader) -> DataLoader:
        if not compat.requires_distributed_sampler(trainer, loader):
            return loader  # already sharded by the user, an iterable dataset, or `use_distributed_sampler=False`
        if len(loader.dataset) < trainer.world_size:  # type: ignore[arg-type]
            return loader  # a rank would get no batch at all
        sampler = UnrepeatedDistributedSamplerWrapper(
            loader.sampler, shuffle=False, **(trainer.distributed_sampler_kwargs or {})
        )
        replaced.append(loader)
        return compat.update_dataloader(loader, sampler, mode=RunningStage.VALIDATING)

    if isinstance(loaders, CombinedLoader):
        loaders.flattened = [
            unrepeated(loader) if isinstance(loader, DataLoader) else loader for loader in loaders.flattened
        ]
    else:
        loaders = apply_to_collection(loaders, DataLoader, unrepeated)
    return loaders if replaced else None


def reduced_moments(trainer: pl.Trainer, recorder: ActivationRecorder) -> dict[str, ActivationMoments]:
    """The statistics of all ranks' shards together (torchmetrics sums the states); identical on every rank.

    Raises:
        ActivationPruningError: the ranks measured different layers, or ended with different statistics.
    """
    if not is_distributed(trainer):
        return recorder.moments()
    # torchmetrics syncs one metric after the other: different layers on different ranks would pair wrong states
    measured = [(name, metric.num_neurons, metric.channel_dim) for name, metric in recorder.metrics.items()]
    check_same_on_every_rank(trainer, measured, "the measured layers")
    moments = recorder.moments()
    check_same_on_every_rank(trainer, moments, "the activation statistics")
    return moments


def synced_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> dict[str, float]:
    """Validation metrics that are the same on every rank, as the plan and the choice of λ need them.

    A metric logged with ``sync_dist=True`` or as a torchmetrics ``Metric`` already is; one logged without is
    each rank's own value, and is averaged over the ranks, which is what ``sync_dist=True`` would have logged.
    """
    if not is_distributed(trainer):
        return dict(metrics)
    check_same_on_every_rank(trainer, list(metrics), "the names of the validation metrics")
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(values).reshape(trainer.world_size, -1).cpu()
    same = (gathered == gathered[0]).all(dim=0)
    reduced = torch.where(same, gathered[0], gathered.mean(dim=0))
    return {name: float(value) for name, value in zip(metrics, reduced.tolist(), strict=True)}


def check_same_on_every_rank(trainer: pl.Trainer, value: object, what: str) -> None:
    """Compare a fingerprint of ``value`` across all ranks; every rank raises the same error if any differs.

    Args:
        trainer: the Trainer; its strategy's ``all_gather`` carries the fingerprints.
        value: tensors, numbers, strings, dataclasses and nested mappings/sequences of them.
        what: what ``value`` is, for the error message.

    Raises:
        ActivationPruningError: the ranks hold different values.
    """
    if not is_distributed(trainer):
        return
    digest = torch.frombuffer(bytearray(fingerprint(value)), dtype=torch.int64)
    gathered = trainer.strategy.all_gather(digest.to(trainer.strategy.root_device))
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank, row in enumerate(gathered.reshape(trainer.world_size, -1).cpu().tolist()):
        groups.setdefault(tuple(row), []).append(rank)
    if len(groups) > 1:
        described = " vs ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}" for r in groups.values())
        raise ActivationPruningError(
            f"ActivationPruning: {what} differ across the {trainer.world_size} processes ({described}), so the"
            " ranks would prune differently; nothing was removed. Every rank must run the same model and the same"
            " validation code, and log validation metrics with `sync_dist=True` or as torchmetrics Metrics."
        )


def fingerprint(value: object) -> bytes:
    """A SHA-256 digest of ``value``'s content: tensors by dtype, shape and bytes, floats exactly.

    Example:
        >>> fingerprint({"a": torch.zeros(2)}) == fingerprint({"a": torch.zeros(2)}) != fingerprint({"a": 0.0})
        True
    """
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.digest()


def _feed(digest: Any, value: object) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"mapping {len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _feed(digest, (type(value).__name__, [getattr(value, f.name) for f in dataclasses.fields(value)]))
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def average_batchnorm_statistics(trainer: pl.Trainer, model: torch.nn.Module) -> None:
    """Make every rank's recalibrated BatchNorm statistics the pooled ones, identical on every rank.

    Each rank recalibrated on its own shard of equally many batches: the pooled mean is the mean of the ranks'
    means, the pooled variance the mean of their second moments minus the pooled mean squared.
    """
    if not is_distributed(trainer):
        return
    for layer in batchnorm_layers(model).values():
        # tracked statistics (`batchnorm_layers` keeps only those): never None
        mean, variance = typing.cast(Tensor, layer.running_mean), typing.cast(Tensor, layer.running_var)
        pooled_mean = trainer.strategy.reduce(mean.clone(), reduce_op="mean")
        second_moment = trainer.strategy.reduce(variance + mean.square(), reduce_op="mean")
        mean.copy_(pooled_mean)
        variance.copy_(second_moment - pooled_mean.square())


def rewrap_after_pruning(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Rebuild the ``DistributedDataParallel`` wrapper around a module pruned in the middle of ``fit``.

    The wrapper's reducer holds the old parameters and their gradient buckets; a new one registers the smaller
    parameters (and checks that every rank has the same shapes). ``strategy.model`` and ``configure_ddp`` are the
    strategy's public API (Lightning >= 2.0).
    """
    strategy = trainer.strategy
    if isinstance(strategy, strategies.DDPStrategy) and isinstance(
        strategy.model, torch.nn.parallel.DistributedDataParallel
    ):
        strategy.model = pl_module
        strategy.configure_ddp()
