"""Serving metrics: multiprocess set-up, the aiohttp ``/metrics`` handler, a standalone server.

Today each ``dispatch worker --metrics-port PORT`` is one process (dramatiq worker threads, no
forking): it builds ``Metrics`` on its own registry and serves it with
``start_metrics_server(PORT, registry)``, one scrape target per worker process. The multiprocess
set-up below is for a supervisor that forks workers behind one endpoint.

When several processes share one endpoint, each keeps its own metric values. In
prometheus_client's multiprocess mode every process writes its values to files in one directory
and whoever serves ``/metrics`` merges those files. prometheus_client chooses file-backed values
from ``PROMETHEUS_MULTIPROC_DIR`` *when it is first imported*, so setting the variable later does
nothing on its own. ``setup_multiprocess`` makes the switch explicit and import-order proof.

Start-up order for a forking supervisor (one directory per service)::

    setup_multiprocess(directory)      # 1. supervisor, before any Metrics and before forking:
                                       #    wipes stale *.db files, sets the variable, switches
                                       #    prometheus_client to file-backed values
    server = start_metrics_server(PORT, directory, host=...)   # 2. serves the merged files
    ... fork/spawn the worker processes ...                     # 3. they inherit the variable
    metrics = Metrics(CollectorRegistry())                      # 4. in each worker process
    mark_process_dead(pid, directory)  # 5. supervisor, when a worker exits (drops its live gauges)

A process started on its own that must write into an existing directory (not wipe it) calls
``attach_multiprocess(directory)`` instead of step 1. ``Metrics`` refuses to build in a process
where the variable is set but prometheus_client was not switched (values would silently stay
in the process).

The API service, a single process, needs none of this: build ``Metrics`` on a registry and
mount ``metrics_handler(registry)`` at ``/metrics``. Never mount the same multiprocess directory
on two scraped endpoints: Prometheus would count every worker's values twice.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry, start_http_server, values
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from monitoring.errors import MultiprocessSetupError
from monitoring.metrics import CAMPAIGN_GAUGES

__all__ = [
    "MetricsServer",
    "MetricsSource",
    "attach_multiprocess",
    "mark_process_dead",
    "metrics_handler",
    "multiprocess_registry",
    "setup_multiprocess",
    "start_metrics_server",
]

#: What an endpoint serves: an in-process registry, or a multiprocess directory to merge.
MetricsSource = CollectorRegistry | Path

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def setup_multiprocess(directory: Path) -> None:
    """Switch this process, and the workers it starts afterwards, to multiprocess metrics.

    Call once in the supervising process, before any ``Metrics`` exists and before workers are
    forked or spawned. Creates ``directory`` if needed and deletes stale ``*.db`` files left by a
    previous run (their counters would otherwise be added to this run's).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    _switch(directory)


def attach_multiprocess(directory: Path) -> None:
    """Write this process's metrics into an existing multiprocess ``directory`` (no wipe)."""
    if not directory.is_dir():
        raise MultiprocessSetupError(f"multiprocess directory {directory} does not exist")
    _switch(directory)


def _switch(directory: Path) -> None:
    current = os.environ.get(_ENV)
    if getattr(values.ValueClass, "_multiprocess", False) and current not in (None, str(directory)):
        raise MultiprocessSetupError(f"this process already writes metrics to {current}; one directory per process")
    os.environ[_ENV] = str(directory)
    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client picked its value class at import time; metric children created from
        # now on read this attribute, so they become file-backed.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int, directory: Path) -> None:
    """Forget a dead worker's ``live*`` gauges (in-flight sends, heartbeat)."""
    prom_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class _MergedFiles(Collector):
    """The merged multiprocess files, without the NaN tombstones of ended campaigns."""

    def __init__(self, directory: Path) -> None:
        self._inner = prom_multiprocess.MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        for metric in self._inner.collect():  # type: ignore[no-untyped-call]
            if metric.name in CAMPAIGN_GAUGES:
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
                if not metric.samples:
                    continue
            yield metric


def multiprocess_registry(directory: Path) -> CollectorRegistry:
    """A registry that merges every process's files in ``directory`` at each collection."""
    if not directory.is_dir():
        raise MultiprocessSetupError(f"multiprocess directory {directory} does not exist")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MergedFiles(directory))
    return registry


def _collector(source: MetricsSource) -> CollectorRegistry:
    return multiprocess_registry(source) if isinstance(source, Path) else source


def metrics_handler(source: MetricsSource) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler serving ``source`` (text format, or OpenMetrics when asked for)."""
    registry = _collector(source)

    async def handle(request: web.Request) -> web.StreamResponse:
        encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        # Merging many processes' files reads the disk: keep it off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, registry)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})

    return handle


@dataclass(frozen=True)
class MetricsServer:
    """A running standalone metrics server (a daemon thread)."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, source: MetricsSource, *, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``source`` at ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port (read it from ``.port``). Pass ``host="0.0.0.0"`` for a
    Prometheus on another machine.
    """
    server, thread = start_http_server(port, addr=host, registry=_collector(source))
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)
