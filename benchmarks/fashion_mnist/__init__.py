"""Benchmark ActivationPruning on Fashion-MNIST against the tools a user would pick instead.

Run from the repository root (CPU only; 2 to 8 minutes on 2 shared cores, training included)::

    python -m benchmarks.fashion_mnist                  # the data must be installed (see below)
    python -m benchmarks.fashion_mnist --install-data   # or: install them first if they are missing

It trains an MLP 784-1024-1024-10 (ReLU, Adam lr 1e-3, batch 128, 10 epochs, seed 0) once and caches its weights
under ``benchmarks/.cache/`` (git-ignored); every comparison starts from a deep copy of those weights. The last 10k
training images are the validation set (statistics and re-validation); accuracy is measured on the 10k test set.
No method is fine-tuned after pruning. Table 3 tests every setting of our options (statistic × compensate ×
normalize) at each target reduction and names the setting the evidence recommends as the defaults.

It rewrites the generated part of ``BENCHMARKS.md`` (between the ``benchmark:begin``/``benchmark:end`` markers; the
text around them is kept) and ``docs/benchmark_accuracy_vs_params.png``, and stores every number in
``benchmarks/.cache/fashion_mnist_results.json`` (``--report-only`` re-renders from it).

The data come from the Debian package ``dataset-fashion-mnist`` (standard IDX files under
``/usr/share/datasets/fashion-mnist``). The benchmark installs it with ``apt-get`` only when asked
(``--install-data``); otherwise a missing dataset stops it with the command to run.

The data (locate, install, load), the MLP, the Trainer, the accuracy and statistics passes and ours at a target
reduction are :mod:`benchmarks.common`'s, which the other benchmarks share. Modules: :mod:`.models` (the MLP's
training cache), :mod:`.methods` (the alternatives to ours and the settings of our options), :mod:`.measure` (size,
latency, cost), :mod:`.compare` (tables 2 and 3 and the rule for the defaults), :mod:`.results` (typed records and
their JSON), :mod:`.report` (Markdown and plot), :mod:`.run` (the whole run and the command line).
"""
