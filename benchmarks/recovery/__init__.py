"""Recovery benchmark (issue 13): prune the Fashion-MNIST MLP, then train the smaller model for 1 or 2 epochs.

Run from the repository root (CPU only; about 5 to 15 minutes on 2 shared cores, depending on the load)::

    python -m benchmarks.recovery                 # the data must be installed (see benchmarks.common.data)
    python -m benchmarks.recovery --epochs 4      # a shorter schedule on a busy machine

The MLP 784-1024-1024-10 of :mod:`benchmarks.fashion_mnist` (the same data, model and recipe: Adam lr 1e-3, batch
128, seed 0) is trained for ``E`` epochs (``--epochs``, default 10). At each target reduction (−80 %, −90 %, −95 %
of the parameters) it compares:

- ours one-shot: the package's plain functions on the trained model (statistics on the validation split,
  the callback's default criterion, :func:`~lightning_actprune.core.plan_for_reduction`), what
  ``ActivationPruning(target_params_reduction=r)`` does at the end of ``fit``;
- ours + recovery: the real callback ``ActivationPruning(target_params_reduction=r, recovery_epochs=R)`` in a
  real ``Trainer.fit`` of ``E + R`` epochs: it prunes after epoch ``E`` and trains the smaller model for ``R``
  more epochs with the same Adam (its state sliced);
- Torch-Pruning as its README shows: ``tp.pruner.MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` or
  ``GroupTaylorImportance()``, ``global_pruning`` on and off, the output layer ignored, ``pruning_ratio``
  bisected to the same reduction, then ``R`` epochs of fine-tuning with a fresh Adam (Torch-Pruning has no way to
  carry the optimizer);
- from scratch: an MLP with our pruned widths trained from random initialisation for ``E + R`` epochs.

The fits with recovery resume from one checkpoint written after ``E - 1`` epochs (weights, Adam state, loop
state), so each costs ``1 + R`` epochs instead of ``E + R``; the training order of every epoch is a permutation
seeded by the epoch's index (:class:`.protocol.EpochShuffle`), which makes a resumed fit the same computation as an
uninterrupted one. Epoch times of the recovery epochs are compared with the unpruned epoch of the same fit.

It writes the section between the ``recovery:begin``/``recovery:end`` markers of ``BENCHMARKS.md`` and stores every
number in ``benchmarks/.cache/recovery_results.json`` (``--report-only`` re-renders from it). ``--methods scratch``
(or any of ``ours``, ``torch-pruning``, ``scratch``) measures only those methods and merges their rows into that
file, which must hold a run of the same configuration, then re-renders the section::

    python -m benchmarks.recovery --methods scratch   # after a full run: measures the scratch rows again

The published results also hold rows of ``ours, gradual (2 prunes)``, measured at commit 14d8739 when gradual
pruning (``pruning_steps``) existed; ``--report-only`` still renders them.

Modules: :mod:`.protocol` (data order, the probe callback, training and every method), :mod:`.results` (typed
records and their JSON), :mod:`.report` (Markdown), :mod:`.run` (the whole run and the command line).
"""
