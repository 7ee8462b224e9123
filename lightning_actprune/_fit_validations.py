"""The fit's own validation passes, put to work twice: before training, and right before a prune.

The first validation of ``fit`` (the sanity check's, when there is one) analyses the model, so that what will be
pruned, what will not and why is said before training, and checks that ``monitor`` is logged. The validation right
before a prune records the activation statistics, so the prune needs no pass of its own. :class:`FitValidations`
owns the recorders: each is entered in an :class:`~contextlib.ExitStack` of its own and closed by that stack, at
the end of its pass or, whatever happens, on teardown.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_actprune import _lightning_compat as compat
from lightning_actprune._analysis import outermost_called
from lightning_actprune._config import PruningSettings
from lightning_actprune._errors import ActivationPruningError
from lightning_actprune._pipeline import RecordedPass, analyse, example_inputs, nothing_prunable, statistics_recorder
from lightning_actprune._statistics import ActivationRecorder
from lightning_actprune._trainer import weights_fingerprint
from lightning_actprune._types import PrunableLayer


class FitValidations:
    """Records what the prune needs from the fit's validation passes; see the module's docstring.

    Args:
        settings: the callback's arguments (``monitor``, the layer patterns, ``prune_heads``).
    """

    def __init__(self, settings: PruningSettings) -> None:
        self.settings = settings
        self.layers: list[PrunableLayer] | None = None
        """What the analysis at the start of ``fit`` found prunable (None until it ran)."""
        self.called: list[str] = []
        """The outermost modules the first validation batch called, in call order (``""``: the module itself)."""
        self._analysis = ExitStack()  # the recorder of the first validation batch, until the analysis ran
        self._statistics = ExitStack()  # the recorder of the validation right before a prune
        self._analysis_recorder: ActivationRecorder | None = None
        self._recorder: ActivationRecorder | None = None
        self._recorded: RecordedPass | None = None
        self._monitor_checked = False

    def reset(self) -> None:
        """A new ``fit``: its model is analysed anew and ``monitor`` checked again."""
        self.close()
        self.layers, self._monitor_checked = None, False

    def start(self, pl_module: pl.LightningModule, prune_follows: bool) -> None:
        """At the start of a validation of ``fit``: record it when a prune follows; analyse if not done yet."""
        self._recorded = None
        if prune_follows and self._recorder is None:
            self._recorder = self._statistics.enter_context(statistics_recorder(self.settings, pl_module))
        if self.layers is None and self._analysis_recorder is None:
            # its first batch's inputs are what the analysis traces with: no statistics are needed
            self._analysis_recorder = self._analysis.enter_context(ActivationRecorder(pl_module, moments=()))

    def first_batch_done(self, pl_module: pl.LightningModule) -> None:
        """After a validation batch: the first one's inputs are what the analysis traces with."""
        recorder, self._analysis_recorder = self._analysis_recorder, None
        if recorder is None:
            return
        self._analysis.close()
        self.called = outermost_called(recorder.example_inputs)
        try:
            # the analysis runs the model: those passes are no validation data for the prune's statistics
            with self._recorder.paused() if self._recorder is not None else nullcontext():
                layers, warned = analyse(self.settings, pl_module, example_inputs(pl_module, recorder))
        except Exception as error:
            rank_zero_warn(
                f"ActivationPruning: analysing {type(pl_module).__name__} at the start of fit failed"
                f" ({type(error).__name__}: {error}); it is tried again when pruning."
            )
            return
        self.layers = layers
        self._say_what_is_prunable(pl_module, layers, warned)

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the end of a validation of ``fit``: check ``monitor`` the first time; keep the recorded pass."""
        logged = compat.epoch_validation_metrics(trainer)
        if not self._monitor_checked:
            self._check_monitor(logged)
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        self._statistics.close()
        self._recorded = RecordedPass(recorder, logged, weights_fingerprint(trainer, pl_module))

    def recorded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, in_fit: bool) -> RecordedPass | None:
        """The last recorded validation, if its statistics are those of the model as it is now (used once)."""
        recorded, self._recorded = self._recorded, None
        return recorded if recorded is not None and recorded.still_valid(trainer, pl_module, in_fit) else None

    def close(self) -> None:
        """Remove every recorder's hooks (teardown, an exception)."""
        self._analysis.close()
        self._statistics.close()
        self._analysis_recorder = self._recorder = self._recorded = None

    def _check_monitor(self, logged: dict[str, float]) -> None:
        """A ``monitor`` that the first validation did not log fails then, not after training."""
        self._monitor_checked = True
        monitor = self.settings.monitor
        if monitor is not None and monitor not in logged:
            raise ActivationPruningError(
                f"`monitor={monitor!r}` is not a metric that `validation_step` logs; logged:"
                f" {', '.join(logged) or '(none)'} (metrics logged with `logger=False` are not seen)."
            )

    @staticmethod
    def _say_what_is_prunable(pl_module: pl.LightningModule, layers: list[PrunableLayer], warned: int) -> None:
        name = type(pl_module).__name__
        if not layers:
            rank_zero_warn(
                f"ActivationPruning: {name} has no prunable layer (seen before training)." + nothing_prunable(pl_module)
            )
            return
        neurons = sum(layer.neurons for layer in layers)
        shown = ", ".join(f"{layer.name} ({layer.neurons})" for layer in layers[:8])
        more = f" and {len(layers) - 8} more" if len(layers) > 8 else ""
        why = "; the warnings above name the layers that will not be pruned and why" if warned else ""
        rank_zero_info(f"ActivationPruning: {len(layers)} prunable layer(s), {neurons} neurons: {shown}{more}{why}.")
