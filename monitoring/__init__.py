"""Prometheus metrics, their exposition, the Grafana dashboard and the alert rules.

``Metrics`` (``monitoring.metrics``) holds every metric the pipeline emits;
``monitoring.exposition`` serves them, across dramatiq's worker processes in multiprocess mode.
``monitoring/grafana/dispatch.json`` and ``monitoring/prometheus/alerts.yml`` query only metrics
defined here (a test keeps them in step). Importing this package has no side effects.
"""

from monitoring.errors import LabelValueError, MonitoringError, MultiprocessSetupError
from monitoring.exposition import (
    MetricsServer,
    MetricsSource,
    attach_multiprocess,
    mark_process_dead,
    metrics_handler,
    multiprocess_registry,
    setup_multiprocess,
    start_metrics_server,
)
from monitoring.metrics import (
    BATCH_STATES,
    CALLBACK_REJECT_REASONS,
    OUTCOMES,
    RETRY_CAUSES,
    Metrics,
    Outcome,
    RetryCause,
    collect_queue_depths,
)

__all__ = [
    "BATCH_STATES",
    "CALLBACK_REJECT_REASONS",
    "OUTCOMES",
    "RETRY_CAUSES",
    "LabelValueError",
    "Metrics",
    "MetricsServer",
    "MetricsSource",
    "MonitoringError",
    "MultiprocessSetupError",
    "Outcome",
    "RetryCause",
    "attach_multiprocess",
    "collect_queue_depths",
    "mark_process_dead",
    "metrics_handler",
    "multiprocess_registry",
    "setup_multiprocess",
    "start_metrics_server",
]
