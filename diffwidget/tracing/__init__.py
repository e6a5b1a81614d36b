"""Observing a diffusers pipeline: the only layer that touches a pipeline's internals."""
