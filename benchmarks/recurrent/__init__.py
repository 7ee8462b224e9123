"""The recurrent benchmark (issue 23): LSTM and GRU classifiers of digits read row by row, pruned by −30%.

``python -m benchmarks.recurrent`` (a few minutes on one CPU thread; see :mod:`benchmarks.recurrent.run`).
"""
