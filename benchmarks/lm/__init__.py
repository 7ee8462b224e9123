"""Language-model benchmark: a small Llama trained on the Python standard library's bytes, pruned by each method.

Run from the repository root (CPU only; at the defaults about 5 minutes a seed on 2 idle cores, 20+ on busy ones)::

    nice -n 10 python -m benchmarks.lm                     # one seed, -30 % and -50 %
    python -m benchmarks.lm --seeds 0 1 2                  # the published table: mean ± spread over 3 seeds
    python -m benchmarks.lm --quick                        # a tiny model on a few files: the protocol in seconds

Data (:mod:`.data`): every non-empty ``*.py`` of ``sysconfig.get_paths()["stdlib"]`` outside installed packages,
test suites and generated files, as bytes (vocabulary 256 + BOS, EOS, PAD), split by file (in the order of a hash
of the relative path: about 150 kB of files for test, 100 kB for validation, the rest, about 9.7 MB, for training),
cut into chunks of 128 bytes; validation and test perplexity count every byte of their files once. The model
(:mod:`.model`) is a ``LlamaForCausalLM`` from ``LlamaConfig``: 4 layers, width 128, 8 query heads over 2 key/value
heads of 16, SwiGLU FFN of 384, RMSNorm, rotary, untied embeddings (821k parameters). It trains ``E = 8`` epochs of
``S = 80`` steps (an "epoch" is ``S`` batches of 16 chunks: ``limit_train_batches``); at each reduction of the
parameters (embeddings and LM head counted) the methods of :mod:`.methods` are compared on test perplexity, side by
side in one run, with the wall-clock of each step as a ratio to one validation pass.

It writes the results as JSON (``--out``) and the report as Markdown (``--markdown``: the section between the
``lm:begin``/``lm:end`` markers of that file; by default a file beside the JSON). Nothing is installed.

Modules: :mod:`.data`, :mod:`.model`, :mod:`.methods`, :mod:`.results` (typed records and their JSON),
:mod:`.report` (Markdown and the goals), :mod:`.run` (the protocol over seeds and the command line).
"""
