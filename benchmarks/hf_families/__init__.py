"""Hugging Face families through the callback's planning: find, prune, oracle, save/load, generate (issue 20).

Run from the repository root (CPU only; about an hour for every family on 2 busy cores, seconds for a few)::

    nice -n 10 python -m benchmarks.hf_families                     # every family that builds from a config
    python -m benchmarks.hf_families --curated                      # issue 20's families only
    python -m benchmarks.hf_families --families llama bert t5       # by curated name or transformers model type

Families (:mod:`.families`): issue 20's 20 families (and Falcon's multi-query layout) from hand-written tiny configs
(``CURATED``, shared with ``tests/test_hf_families.py``), then every other ``model_type`` of the installed
transformers from its default config shrunk (2 layers, width 64, 4 heads over 2 key/value heads, …), as the class of
its first task among a list (causal LM first, the bare model last). Each runs in a process of its own, forked from a
server that has imported torch and transformers once, under a memory and a CPU-time cap, so that one failure or one
slow family never stops the sweep (:mod:`.run`). Per family (:mod:`.check`): statistics of a random batch,
``find_prunable_layers``, the plan ``ActivationPruning`` chooses for ``target_params_reduction=0.3``, the surgery,
and the checks: the zeroing oracle, ``save_pretrained`` → the stock ``from_pretrained`` (and ours), ``uniform_widths``
with the model's own ``save_pretrained``, ``generate`` with and without the cache.

It writes the results as JSON (``--out``, :mod:`.results`) and the report as Markdown (``--markdown``: the section
between the ``hf-families:begin``/``:end`` markers of that file; by default a file beside the JSON, :mod:`.report`).
"""
