"""Gradient health, memory accounting, the Prometheus exporter and the run history.

Import the exporter (`distbackprop.metrics.exporter`, prometheus_client) and the
history writer (`distbackprop.metrics.history`, pyarrow) from their modules:
workers need only the statistics here, and this package keeps their imports light.
"""

from .health import (
    PHASES,
    StepStats,
    classify,
    grad_health,
    layer_norms,
    update_ratios,
    update_ratios_between,
)
from .memory import model_bytes, peak_rss_bytes, process_memory, rss_bytes

__all__ = [
    "PHASES", "StepStats", "classify", "grad_health", "layer_norms", "model_bytes",
    "peak_rss_bytes", "process_memory", "rss_bytes", "update_ratios", "update_ratios_between",
]
