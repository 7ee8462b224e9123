"""ViT benchmark (issue 21): heads and FFN neurons on one scale, against Torch-Pruning's ViT recipe, 3 seeds.

Run from the repository root (CPU only; about 15 minutes per seed on one thread; the seeds can run side by side)::

    python -m benchmarks.vit                                   # seeds 0 1 2, one after the other
    python -m benchmarks.vit --seeds 0 --out s0.json            # one seed per process, then:
    python -m benchmarks.vit --merge s0.json s1.json s2.json    # one table, written to BENCHMARKS.md

A small timm ViT (6 blocks × 4 heads, width 128, FFN 512, 7×7 patches, 1.2M parameters) is trained 4 epochs on
20,000 Fashion-MNIST images per seed (cached under ``benchmarks/.cache/vit``). At −30/−50/−70 % of the parameters it
compares: ours one-shot with the default criterion and with the one it replaced (per-layer standardised
fluctuation); ours with one recovery epoch (the real callback, ``prune_on: fit_start``) with and without
distillation; Torch-Pruning's timm ViT example (Taylor or L2, global or uniform; embedding width, head dimensions
and FFN) one-shot and fine-tuned one epoch; and our −50 % architecture trained from scratch for 5 epochs.

It writes the section between the ``vit:begin``/``vit:end`` markers of ``BENCHMARKS.md`` and stores every number in
``benchmarks/.cache/vit_results.json`` (``--report-only`` re-renders from it).

Modules: :mod:`.models` (the ViT and its recipe), :mod:`.data` (data and cached bases), :mod:`.methods` (every
method), :mod:`.results` (records), :mod:`.report` (Markdown), :mod:`.run` (the run and the command line).
"""
