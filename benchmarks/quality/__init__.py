"""Quality benchmark (issue 21): the ViT, the MLP and the BatchNorm ResNet against Torch-Pruning, 3 seeds.

Run from the repository root (CPU only; about 15 minutes per seed on one thread; the seeds can run side by side)::

    python -m benchmarks.quality --arch vit                                  # seeds 0 1 2, one after the other
    python -m benchmarks.quality --arch vit --seeds 0 --out s0.json          # one seed per process, then:
    python -m benchmarks.quality --arch vit --merge s0.json s1.json s2.json  # one table, written to BENCHMARKS.md

``--arch vit``: a small timm ViT (6 blocks × 4 heads, width 128, FFN 512, 7×7 patches, 1.2M parameters) trained 4
epochs on 20,000 Fashion-MNIST images per seed; ``--arch mlp``: the MLP 784-1024-1024-10, 10 epochs; ``--arch
resnet``: the BatchNorm ResNet of 8/16/32 channels, 2 epochs (bases cached under ``benchmarks/.cache/quality``). At
−30/−50/−70 % of the parameters (and −95 % for the MLP) it compares: ours one-shot with the default criterion
and with per-layer standardised fluctuation (BatchNorm recalibrated after each one-shot prune, as the callback
does); ours with one recovery epoch (the real callback, ``prune_on: fit_start``) with and without distillation;
Torch-Pruning's timm ViT example (Taylor or L2, global or uniform; embedding width, head dimensions and FFN; for
the others their widths) one-shot and fine-tuned one epoch; and our −50 % architecture trained from scratch for the
base's epochs plus one.

It writes the section between the ``quality-<arch>:begin``/``end`` markers of ``BENCHMARKS.md`` and stores every
number in ``benchmarks/.cache/quality_<arch>_results.json`` (``--report-only`` re-renders from it).

Modules: :mod:`.models` (the networks and their recipes), :mod:`.data` (data and cached bases), :mod:`.methods` (every
method), :mod:`.results` (records), :mod:`.report` (Markdown), :mod:`.run` (the run and the command line).
"""
