"""Showing a trace: state schema, codecs, the anywidget model and the Explorer façade."""
