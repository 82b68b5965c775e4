"""Multiprocess metrics in real processes, and the /metrics endpoints.

prometheus_client decides per process whether values are file-backed, so everything that
switches a process to multiprocess mode runs in a subprocess, never in the pytest process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitoring.exposition import metrics_handler, multiprocess_registry, start_metrics_server
from monitoring.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent

#: A supervisor as ``dispatch worker --metrics-port`` will be: set up, serve, start two workers
#: one after the other, reap the first, print what its endpoint serves.
SUPERVISOR = textwrap.dedent(
    """
    import multiprocessing, sys, urllib.request
    from pathlib import Path

    # Imported before set-up on purpose: the explicit switch must not depend on import order.
    import prometheus_client
    from monitoring.exposition import mark_process_dead, setup_multiprocess, start_metrics_server
    from monitoring.metrics import Metrics


    def first_worker() -> None:
        m = Metrics(prometheus_client.CollectorRegistry())
        assert m.multiprocess
        m.record_send("sms", "twilio", "sent", n=3)
        m.observe_latency("twilio", 0.004)
        m.record_retry("twilio", "http_429")
        m.set_queue_depth("dispatch.sms", 10)
        m.heartbeat(now=1000.0)
        with m.inflight("twilio", n=2):
            pass
        m.set_campaign_progress("c-1", sent=5, total=50, estimated_finish_ts=900.0, deadline_ts=800.0)
        m.set_campaign_progress("c-2", sent=1, total=9, deadline_ts=700.0)


    def second_worker() -> None:
        m = Metrics(prometheus_client.CollectorRegistry())
        m.record_send("sms", "twilio", "sent", n=4)
        m.observe_latency("twilio", 2.0)
        m.set_queue_depth("dispatch.sms", 5)
        m.heartbeat(now=2000.0)
        m.end_campaign("c-1")


    if __name__ == "__main__":
        directory, method = Path(sys.argv[1]), sys.argv[2]
        setup_multiprocess(directory)
        server = start_metrics_server(0, directory)
        ctx = multiprocessing.get_context(method)
        first = ctx.Process(target=first_worker)
        first.start(); first.join()
        second = ctx.Process(target=second_worker)
        second.start(); second.join()
        assert first.exitcode == 0 and second.exitcode == 0, (first.exitcode, second.exitcode)
        url = f"http://127.0.0.1:{server.port}/metrics"
        before = urllib.request.urlopen(url, timeout=10).read().decode()
        mark_process_dead(first.pid, directory)
        after = urllib.request.urlopen(url, timeout=10).read().decode()
        server.close()
        print(f"{first.pid} {second.pid}")
        print(before)
        print("=====")
        print(after)
    """
)


def run_python(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def series_of(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in found if n == name]


def test_two_worker_processes_aggregate_and_restart_wipes_stale_files(tmp_path: Path) -> None:
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR)
    directory = tmp_path / "prom"

    # Second run on the same directory: set-up must wipe the first run's files (no doubling),
    # and spawned workers (fresh interpreters) must pick the mode up from the environment.
    for method in ("fork", "spawn"):
        done = run_python([str(script), str(directory), method])
        assert done.returncode == 0, done.stderr
        pids, rest = done.stdout.split("\n", 1)
        first_pid, second_pid = pids.split()
        before_text, after_text = rest.split("=====")
        before, after = samples(before_text), samples(after_text)

        sent = get(before, "dispatch_messages_total", channel="sms", provider="twilio", outcome="sent")
        assert sent == 7, method
        assert get(before, "dispatch_send_latency_seconds_count", provider="twilio") == 2
        assert get(before, "dispatch_send_latency_seconds_bucket", provider="twilio", le="0.005") == 1
        assert get(before, "dispatch_send_retries_total", provider="twilio", cause="http_429") == 1
        # mostrecent: the later writer wins.
        assert get(before, "dispatch_queue_depth", queue="dispatch.sms") == 5
        # The campaign ended by the second process is gone from the merged view; the other stays.
        assert not [s for s in series_of(before, "dispatch_campaign_sent_messages") if s["campaign"] == "c-1"]
        assert get(before, "dispatch_campaign_sent_messages", campaign="c-2") == 1
        assert get(before, "dispatch_campaign_deadline_timestamp_seconds", campaign="c-2") == 700
        assert get(before, "dispatch_campaign_estimated_finish_timestamp_seconds", campaign="c-1") is None
        # liveall: one heartbeat per worker process until the supervisor reaps one.
        assert get(before, "dispatch_worker_heartbeat_timestamp_seconds", pid=first_pid) == 1000
        assert get(before, "dispatch_worker_heartbeat_timestamp_seconds", pid=second_pid) == 2000
        assert get(after, "dispatch_worker_heartbeat_timestamp_seconds", pid=first_pid) is None
        assert get(after, "dispatch_worker_heartbeat_timestamp_seconds", pid=second_pid) == 2000
        assert get(after, "dispatch_messages_total", channel="sms", provider="twilio", outcome="sent") == 7


def test_metrics_refuse_a_half_set_up_process(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import os, sys
        import prometheus_client
        from monitoring.errors import MultiprocessSetupError
        from monitoring.metrics import Metrics
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]   # too late: already imported
        try:
            Metrics(prometheus_client.CollectorRegistry())
        except MultiprocessSetupError as exc:
            print("refused:", exc)
        else:
            print("accepted")
        """
    )
    (tmp_path / "prom").mkdir()
    done = run_python(["-c", code, str(tmp_path / "prom")])

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:"), done.stdout
    assert "setup_multiprocess" in done.stdout
    assert list((tmp_path / "prom").iterdir()) == []


def test_attached_process_writes_into_an_existing_directory_without_wiping(tmp_path: Path) -> None:
    directory = tmp_path / "prom"
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import prometheus_client
        from monitoring.exposition import attach_multiprocess
        from monitoring.metrics import Metrics
        attach_multiprocess(Path(sys.argv[1]))
        Metrics(prometheus_client.CollectorRegistry()).record_send("email", "sendgrid", "sent", n=int(sys.argv[2]))
        """
    )
    directory.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    for n in ("2", "5"):
        done = run_python(["-c", code, str(directory), n], env=env)
        assert done.returncode == 0, done.stderr

    # Read in this (single-process) interpreter: merging files needs no mode switch.
    registry = multiprocess_registry(directory)
    value = registry.get_sample_value(
        "dispatch_messages_total", {"channel": "email", "provider": "sendgrid", "outcome": "sent"}
    )
    assert value == 7


async def test_aiohttp_handler_serves_text_and_openmetrics() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.record_send("webhook", "wechat", "failed", n=2)
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(metrics.registry))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await response.text()
            headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with session.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                open_text = await response.text()
    finally:
        await runner.cleanup()

    found = samples(text)
    assert get(found, "dispatch_messages_total", channel="webhook", provider="wechat", outcome="failed") == 2
    assert open_text.rstrip().endswith("# EOF")


def test_standalone_server_serves_a_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_queue_depth("dispatch.email", 42)
    server = start_metrics_server(0, metrics.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.close()

    assert get(samples(text), "dispatch_queue_depth", queue="dispatch.email") == 42
