"""Benchmark BatchNorm recalibration after pruning a small ResNet on Fashion-MNIST (issue 13).

Run from the repository root (CPU only; the data must be installed, see :mod:`benchmarks.common.data`)::

    python -m benchmarks.fashion_cnn

It trains a small ResNet (BatchNorm, residual blocks) for 2 epochs once and caches its weights under
``benchmarks/.cache/``; at −30%, −50% and −70% of the parameters it compares our one-shot pruning, the same after
BatchNorm recalibration (what ``ActivationPruning`` does by default), Torch-Pruning's ``MetaPruner`` with the same
budget (with and without the same recalibration), and the network of the same widths trained from scratch. At the
``--recovery-targets`` (default: all three) it also trains one epoch more: ours as one ``fit`` with
``ActivationPruning(target_params_reduction=r, recovery_epochs=1)``, Torch-Pruning's network fine-tuned one epoch
with a fresh Adam, and from scratch with one more epoch; it times the recovery epoch against the unpruned ones. It
rewrites the part of ``BENCHMARKS.md`` between the ``benchmark-cnn:begin``/``benchmark-cnn:end`` markers and stores
every number in ``benchmarks/.cache/fashion_cnn_results.json`` (``--report-only`` re-renders from it).

The data, the classifier's training and the measurements are :mod:`benchmarks.common`'s. Modules: :mod:`.models`
(the ResNet, training and its cache), :mod:`.methods` (recalibration, Torch-Pruning, the from-scratch widths),
:mod:`.results` (typed records and their JSON), :mod:`.report` (Markdown), :mod:`.run` (the whole run and the command
line).
"""
