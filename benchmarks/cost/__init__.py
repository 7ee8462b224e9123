"""What the prune step costs at the defaults and native resolutions, in validation passes (issue 23).

``python -m benchmarks.cost [--models densenet161 vit_b_16] [--images 64] [--baseline 5fd020c]`` runs, for each
model and for each version of the package (the ``--baseline`` commit, extracted with ``git archive``, and this
checkout), one process that fits a Lightning module with ``ActivationPruning(target_params_reduction=0.3)`` and
``max_epochs=0`` on random images at the model's native resolution, and times:

- a plain validation pass (``trainer.validate`` without the callback, before and after the fit);
- the prune step: the analysis the callback runs at the first validation batch of ``fit`` and its ``prune``
  (statistics pass, scoring, target search, surgery, BatchNorm recalibration, the passes after the surgery);
- the validation passes inside the prune step (every ``trainer.validate`` it calls), so that everything else
  (analysis, checks, scoring, surgery) is the prune step less those passes;
- the per-batch cost of recording statistics: validation batches with and without ``ActivationRecorder``.

The two versions run alternately, one process each, with the same threads and niceness, so that a busy machine
slows both alike. Results go to ``benchmarks/.cache/cost.json`` and a generated section of ``BENCHMARKS.md``.
"""
