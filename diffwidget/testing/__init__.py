"""Small pipelines and traces for tests, examples and benchmarks.

Nothing else in the package imports this module: :mod:`diffwidget.testing.tiny` and
:mod:`diffwidget.testing.tiny_dit` build random-weight pipelines of every denoiser family from
configs (no download), :mod:`diffwidget.testing.synthetic` builds traces of any shape without
torch.
"""
