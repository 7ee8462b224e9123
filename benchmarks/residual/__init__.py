"""Residual channels across timm's transformers: where ``prune_residual`` finds the stream, and whether it is exact.

``python -m benchmarks.residual``: each model is built from its config (random weights, 10 classes, its native input
size), analysed with ``find_prunable_layers(..., prune_residual=True)`` on 4 random inputs, and then, where a residual
layer is found, a quarter of its channels (every fourth) is removed alone with ``apply_plan``. The row reports the
residual width, the parameters that quarter removes, and the largest difference between the pruned model and the
unpruned one with those channels zeroed where the norms and the layers reading the stream read them; where no
residual layer is found, the reason the analysis gives. No data, no training: the structure is what is measured.
"""
