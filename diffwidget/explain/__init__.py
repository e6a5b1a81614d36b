"""Explanation methods computed from a trace: one class per method, one verb each."""
