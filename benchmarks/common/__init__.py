"""What the benchmarks share: data, models, measurements, typed records, reports, the command line, the machine.

Every benchmark imports only this package and ``lightning_actprune``, never another benchmark.

- :mod:`.data`: Fashion-MNIST (:func:`~.data.locate_fashion_mnist`, which installs the Debian package only when
  asked, :func:`~.data.load_fashion_mnist`) and :class:`~.data.SplitDataModule` (fixed train/validation/test
  tensors, seeded shuffling);
- :mod:`.models`: :class:`~.models.Classifier` (cross-entropy, Adam, ``val_acc``/``test_acc``), the
  :class:`~.models.MLPClassifier` and its recipe :class:`~.models.TrainConfig`, the small BatchNorm
  :class:`~.models.ResNetClassifier`, :func:`~.models.quiet_trainer` (a
  CPU Trainer that writes nothing) and :func:`~.models.train_cached` (train once, load the weights afterwards);
- :mod:`.measure`: :class:`~.measure.Evaluator` (test accuracy and validation passes through one Trainer) and
  :func:`~.measure.gather_statistics` (one validation pass with an ``ActivationRecorder``: layers and moments);
- :mod:`.pruning`: ours as ``target_params_reduction`` chooses the plan (:func:`~.pruning.ours_at_reduction`),
  :func:`~.pruning.pruned_copy`, :func:`~.pruning.widths_of`, :func:`~.pruning.bisect_ratio` (a competitor's
  ratio found for a parameter reduction) and :func:`~.pruning.recalibrated` (BatchNorm statistics re-estimated);
- :mod:`.records`: :class:`~.records.JsonRecord` (a dataclass mixin: ``to_json``/``from_json``),
  :class:`~.records.FlatJsonRecord` (a record of records written as one flat object) and
  :func:`~.records.from_plain`, which rebuilds nested dataclasses from JSON data, and :func:`~.records.short_hash` (a
  cache file name for what a result depends on);
- :mod:`.markdown`: :func:`~.markdown.markdown_table` (pipes in cells escaped, columns aligned by a spec),
  :func:`~.markdown.write_section` (the text between two markers of a file, the rest kept),
  :func:`~.markdown.mean_spread` (``mean ± spread`` over seeds) and the cells :func:`~.markdown.pct`,
  :func:`~.markdown.acc` and :func:`~.markdown.delta`;
- :mod:`.command`: :func:`~.command.command_line` (the command that ran a benchmark, quoted so it can be pasted),
  :func:`~.command.add_common_arguments`, :func:`~.command.last_results` (for ``--report-only``),
  :func:`~.command.quiet_run_log` and the default paths :data:`~.command.DEFAULT_CACHE` and
  :data:`~.command.DEFAULT_MARKDOWN`;
- :mod:`.machine`: :class:`~.machine.Machine` and :func:`~.machine.machine_info` (CPU, cores, versions, threads).
"""

from .command import DEFAULT_CACHE, DEFAULT_MARKDOWN, add_common_arguments, command_line, last_results, quiet_run_log
from .data import INSTALL_COMMAND, SplitDataModule, load_fashion_mnist, locate_fashion_mnist
from .machine import Machine, machine_info
from .markdown import acc, delta, markdown_table, mean_spread, pct, write_section
from .measure import Evaluator, gather_statistics
from .models import Classifier, MLPClassifier, ResNetClassifier, TrainConfig, quiet_trainer, train_cached
from .pruning import bisect_ratio, ours_at_reduction, pruned_copy, recalibrated, widths_of
from .records import FlatJsonRecord, JsonRecord, from_plain, short_hash

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_MARKDOWN",
    "INSTALL_COMMAND",
    "Classifier",
    "Evaluator",
    "FlatJsonRecord",
    "JsonRecord",
    "MLPClassifier",
    "Machine",
    "ResNetClassifier",
    "SplitDataModule",
    "TrainConfig",
    "acc",
    "add_common_arguments",
    "bisect_ratio",
    "command_line",
    "delta",
    "from_plain",
    "gather_statistics",
    "last_results",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "machine_info",
    "markdown_table",
    "mean_spread",
    "ours_at_reduction",
    "pct",
    "pruned_copy",
    "quiet_run_log",
    "quiet_trainer",
    "recalibrated",
    "short_hash",
    "train_cached",
    "widths_of",
    "write_section",
]
