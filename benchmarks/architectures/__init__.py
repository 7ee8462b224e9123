"""Every torchvision classification model under 30M parameters through the callback's path (issue 14).

``python -m benchmarks.architectures [--models resnet18 regnet_y_400mf] [--timeout 300]`` builds each model from
its config (random weights, 10 classes), then, in a subprocess of its own (one thread, bounded memory): finds the
prunable layers, records statistics on 16 random images, plans a 30 % parameter reduction at the callback's defaults
(``fluctuation`` over each layer's mean), applies it and checks that the pruned model equals the original with the
removed neurons zeroed. Results go to ``benchmarks/.cache/architectures.json`` and a generated section of
``BENCHMARKS.md``. Native resolutions and the wall-clock cost in validation passes: :mod:`benchmarks.cost`.
"""
