"""Per-architecture benchmark: models from torchvision, timm and Hugging Face configs, pruned by the callback.

``python -m benchmarks.zoo`` builds each architecture from its library's config (random initialisation, no
download), trains it a few epochs on data this package makes or ships (scikit-learn's digits upscaled to 32×32 for
the vision models; synthetic token sequences for the text models), and runs one real ``Trainer.fit`` with
``ActivationPruning(target_params_reduction=0.3, recovery_epochs=1)``. Per architecture it reports the fraction of
parameters that is prunable at all, the analysis cost (dependency tracing and checks) as a ratio to one validation
pass of 2,000 samples, and the validation accuracy before the prune, right after it (and BatchNorm recalibration)
and after one recovery epoch. Architectures whose library is not installed are listed as skipped.
"""
