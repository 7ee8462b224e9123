"""What the callback checks at ``setup``, before training: the settings against the Trainer and the model.

A misconfiguration that would only show at the prune (no validation data, a pattern that matches nothing, a
strategy whose parameters cannot be cut in place, recovery epochs that cannot fit) fails here, before any epoch.
"""

from __future__ import annotations

import fnmatch

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._config import PruningSettings
from lightning_actprune._distributed import check_strategy
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._heads import projection_owners
from lightning_actprune._statistics import MEASURED_TYPES
from lightning_actprune._trainer import keeps_parameter_copies


def check_fit(settings: PruningSettings, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise an :class:`ActivationPruningError` for every setting that this ``fit`` cannot work with."""
    source = compat.data_source(trainer.fit_loop.epoch_loop.val_loop)
    if not is_overridden("validation_step", pl_module) or not source.is_defined():
        raise ActivationPruningError(
            "ActivationPruning needs validation data: implement `validation_step` and pass `val_dataloaders`"
            " (or a datamodule with `val_dataloader`) to `trainer.fit`."
        )
    if trainer.limit_val_batches == 0:
        raise ActivationPruningError("ActivationPruning needs validation batches; got `Trainer(limit_val_batches=0)`.")
    check_patterns(settings, pl_module)
    if settings.prune_best and trainer.checkpoint_callback is None:
        raise ActivationPruningError("`prune_best=True` needs a `ModelCheckpoint` callback on the Trainer.")
    check_strategy(trainer.strategy)  # spawned workers and sharded parameters cannot be pruned in place
    if settings.recovery_epochs:
        check_recovery(settings, trainer)


def check_patterns(settings: PruningSettings, pl_module: pl.LightningModule) -> None:
    """Patterns that match no Linear/Conv at all fail before training, not after it."""
    names = [name for name, m in pl_module.named_modules() if isinstance(m, MEASURED_TYPES)]
    names += [name for name in projection_owners(pl_module) if name not in names]  # nn.MultiheadAttention
    for argument, patterns in (("layers", settings.layers or []), ("exclude", settings.exclude or [])):
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                raise ActivationPruningError(
                    f"`{argument}` pattern {pattern!r} matches no Linear/Conv layer of {type(pl_module).__name__};"
                    f" its Linear/Conv layers are: {', '.join(names) or '(none)'}."
                )


def check_recovery(settings: PruningSettings, trainer: pl.Trainer) -> None:
    """Settings that recovery inside ``fit`` cannot work with fail before training, not at the prune."""
    epochs, recovery = trainer.max_epochs, settings.recovery_epochs
    if epochs is None or epochs <= recovery or trainer.max_steps != -1:
        raise ActivationPruningError(
            f"`recovery_epochs={recovery}` prunes after epoch `max_epochs - recovery_epochs` of `max_epochs`:"
            f" it needs `Trainer(max_epochs)` > {recovery} and no `max_steps`; got"
            f" max_epochs={epochs}, max_steps={trainer.max_steps}."
        )
    averaging = [type(c).__name__ for c in getattr(trainer, "callbacks", []) if keeps_parameter_copies(c)]
    if averaging:
        raise ActivationPruningError(
            f"`recovery_epochs` cannot be combined with {', '.join(averaging)}: it keeps its own copy of every"
            " parameter, which pruning inside `fit` would leave at the old shapes."
        )
