"""Telemetry: what a run measures and where it goes (a rank-gated sink)."""

from moelab.telemetry.sink import MLflowSink, NullSink, Sink, make_sink

__all__ = ["MLflowSink", "NullSink", "Sink", "make_sink"]
