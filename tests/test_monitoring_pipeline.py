"""A real Prometheus scrapes the real pipeline during a campaign; the dashboard and alerts have data.

Two ``dispatch worker`` processes (each with ``DISPATCH_METRICS_PORT``) send a campaign to the
mock provider, which answers slowly and now and then with 503 or 429 so that retries happen.
Prometheus (Debian package ``prometheus``; the harness of ``test_monitoring_promql`` installs or
finds it, or skips) scrapes both workers every second with the alert rules loaded. While the
campaign runs, every dashboard expression (template variables set to the campaign and provider
the dashboard's own variable queries return) must return data, every input series of every
alert must exist, the alerts the scenario provokes (ETA past the deadline, sustained 429s) must
be active, and no label value may look like an address. When the campaign ends its series go.

``KNOWN_GAPS`` lists the dashboard expressions the workers cannot feed yet, with the reason; the
test fails if any other expression is empty, and also if a known gap starts returning data (so
the list shrinks when the pipeline grows).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from test_monitoring_promql import (
    alert_expressions,
    api,
    dashboard_expressions,
    dashboard_variable_metrics,
    free_port,
    prometheus_bin,
    referenced_metrics,
    running_prometheus,
    wait_http,
)

from dispatch.api.auth import ApiKeyStore
from dispatch.api.client import DispatchClient
from dispatch.campaign import CampaignSpec
from dispatch.config import Settings
from loadtest.audience import generate_rows
from loadtest.cluster import LocalCluster
from loadtest.demo import run_campaign

__all__ = ["prometheus_bin"]  # the fixture, imported so that pytest finds it here

CAMPAIGN = "mon-pipeline"
PROVIDER = "twilio"
RECIPIENTS = 2600
#: The campaign's cap (messages/s): ~2,500 accepted recipients take ~17 s however fast the machine.
CAMPAIGN_RATE = 150.0
#: A provider that answers in 40 ms and now and then with 503 or 429 (so that retries happen).
FAULTS = '{"latency_ms": 40, "p_503": 0.05, "p_429": 0.02, "retry_after_s": 0.2}'
#: Seconds of campaign before the expressions are evaluated (rate windows need a few scrapes).
EVALUATE_AFTER_S = 8.0
#: Grafana's variables: ranges Prometheus can fill within seconds, the variables' live values.
RANGES = {"$__rate_interval": "15s", "$__interval": "15s", "$__range": "1m"}

#: Dashboard expressions the real pipeline cannot feed yet, and why (see the module docstring).
KNOWN_GAPS: dict[str, str] = {
    "sum by (provider, state) (increase(dispatch_provider_breaker_transitions_total[10m]))": "this campaign's "
    "scattered 503s never open a breaker (tests/test_resilience.py opens one)",
    'sum by (channel) (dispatch_engagement_messages{event="human_opens"}) / (sum by (channel) '
    '(dispatch_engagement_messages{event="delivered"}) > 0 or sum by (channel) '
    '(dispatch_engagement_messages{event="sent"}))': "engagement gauges come from round reports "
    "(dispatch serve's scheduler), not from workers",
    'sum by (channel) (dispatch_engagement_messages{event="clicks"}) / (sum by (channel) '
    '(dispatch_engagement_messages{event="delivered"}) > 0 or sum by (channel) '
    '(dispatch_engagement_messages{event="sent"}))': "engagement gauges come from round reports",
    'sum by (channel, event) (dispatch_engagement_messages{event=~"delivered|human_opens|machine_opens|clicks|'
    'replies|optouts"})': "engagement gauges come from round reports",
    "sum by (provider, resolution) (increase(dispatch_in_doubt_total[10m]))": "nothing is in doubt without a crash "
    "or a lost answer (tests/test_inflight.py, dispatch chaos)",
    "sum by (action) (increase(dispatch_sweeps_total[10m]))": "no campaign stalls in this run",
}

#: Series the campaign must move (not just the zeros workers prime at start-up): query -> why.
MUST_MOVE = {
    'sum(dispatch_messages_total{outcome="sent"})': "sent messages",
    'sum(dispatch_messages_total{outcome="retried"})': "retried sends",
    'sum(dispatch_send_retries_total{cause="http_5xx"})': "503 answers counted as http_5xx retries",
    'sum(dispatch_send_retries_total{cause="http_429"})': "429 answers counted as http_429 retries",
    "sum(dispatch_send_latency_seconds_count)": "latency observations",
    'sum(dispatch_batches_total{state="started"})': "started batches",
    'sum(dispatch_batches_total{state="completed"})': "completed batches",
    "max_over_time(max(dispatch_queue_depth)[1m:1s])": "queue depth while batches wait",
    "max_over_time(sum(dispatch_ratelimit_wait_seconds_count)[1m:1s])": "rate-limiter acquisitions",
    "max_over_time(sum(dispatch_inflight_sends)[1m:1s])": "provider calls in flight",
}
#: MUST_MOVE entries the workers do not move yet, and why.
KNOWN_STILL: dict[str, str] = {}

_EMAIL = re.compile(r"[^\s@]+@[^\s@]+")
#: Seven or more digits standing alone, possibly split by spaces, dashes or brackets (a digit run
#: inside a word, like an account SID, or in a dotted number, like an IP address, is no phone).
_PHONE = re.compile(r"(?<![\w.])\+?\d(?:[\s\-()]*\d){6,}(?![\w.])")


@pytest.fixture
def settings(cluster_settings: Settings) -> Settings:
    return replace(cluster_settings, send_concurrency=16, sms_rate=1000.0)  # an account limit: its rate gauges


def get(base: str, path: str, **params: str) -> Any:
    """A Prometheus HTTP API reply (JSON)."""
    return api(base, path, **params)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    reply = get(base, "/api/v1/query", query=promql)
    assert reply["status"] == "success", f"{promql}: {reply}"
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(r["value"][1])) for r in result)


def wait_until(what: str, check: Callable[[], bool], deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, f"timed out after {deadline_s} s waiting for {what}"
        time.sleep(0.25)


def grafana_escape(value: str) -> str:
    """A multi-value variable's value as Grafana writes it into a PromQL regex string.

    (Label values here never hold a backslash, which Grafana would double twice.)
    """
    return re.sub(r"([$^*{}\[\]+?.()|])", r"\\\\\1", value)


def variable_values(base: str) -> dict[str, str]:
    """What Grafana's ``label_values(metric, label)`` variable queries return, as a regex."""
    values = {}
    for variable, metric in dashboard_variable_metrics():
        found = get(base, f"/api/v1/label/{variable}/values", **{"match[]": metric})["data"]
        assert found, f"template variable ${variable}: no {variable} values on {metric}"
        values[f"${variable}"] = "|".join(grafana_escape(str(v)) for v in found)
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    for variable, replacement in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + variable[1:] + "}", replacement).replace(variable, replacement)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def alert_inputs(expr: str) -> list[str]:
    """Each metric selector of an alert expression, with its matchers but without range or offset."""
    inputs = []
    for name in dict.fromkeys(referenced_metrics(expr)):
        for match in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])(\{{[^}}]*\}})?", expr):
            inputs.append(name + (match.group(1) or ""))
    return list(dict.fromkeys(inputs))


def check_dashboard(base: str, values: dict[str, str]) -> None:
    empty, no_longer_gaps = [], []
    for title, expr in dashboard_expressions():
        promql = substitute(expr, values)
        data = has_data(query(base, promql))
        if expr in KNOWN_GAPS:
            if data:
                no_longer_gaps.append(f"{title}: {expr}")
        elif not data:
            empty.append(f"{title}: {promql}")
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)
    assert not no_longer_gaps, "known gaps that now have data (remove them from KNOWN_GAPS):\n" + "\n".join(
        no_longer_gaps
    )
    stale = set(KNOWN_GAPS) - {expr for _, expr in dashboard_expressions()}
    assert not stale, f"KNOWN_GAPS names expressions the dashboard no longer has: {stale}"


def check_alerts(base: str) -> None:
    for alert, expr in alert_expressions():
        query(base, expr)  # evaluates without error
        inputs = alert_inputs(expr)
        assert inputs, f"{alert}: no metric selector found in {expr!r}"
        for selector in inputs:
            assert has_data(query(base, selector)), f"{alert}: input {selector} has no data"
    loaded = [r for g in get(base, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert len(loaded) == len(alert_expressions())
    for rule in loaded:
        assert rule["health"] == "ok", rule
        assert not rule.get("lastError"), rule


def active_alerts(base: str) -> set[tuple[str, str]]:
    """(alert name, campaign or provider) of every pending or firing alert."""
    alerts = get(base, "/api/v1/alerts")["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("campaign") or a["labels"].get("provider", "")) for a in alerts}


@contextlib.contextmanager
def running_api_process(cluster: LocalCluster, port: int) -> Iterator[str]:
    """``dispatch serve`` as its own process on the cluster's Redis, like a deployment runs it."""
    proc = subprocess.Popen(  # our own command
        [sys.executable, "-m", "dispatch.cli", "serve", "--port", str(port)],
        env=cluster.env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_no_addresses(base: str, worker_ports: list[int], rows: list[dict[str, str]]) -> None:
    series = get(base, "/api/v1/series", **{"match[]": '{__name__=~".+"}'})["data"]
    assert len(series) > 100
    recipients = {row["phone"] for row in rows if row["phone"]} | {row["id"] for row in rows}
    for labels in series:
        for label, value in labels.items():
            assert not _EMAIL.search(value), f"{label}={value!r} looks like an email address"
            assert not _PHONE.search(value), f"{label}={value!r} looks like a phone number"
            assert value not in recipients, f"{label}={value!r} is recipient data"
    for port in worker_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "dispatch_" in text
        leaked = [r for r in recipients if r.startswith("+") and r in text]
        assert not leaked, f"worker on port {port} exposes recipient numbers: {leaked[:3]}"


def test_prometheus_scrapes_a_running_campaign_and_every_expression_has_data(
    prometheus_bin: Path, settings: Settings, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    rows = list(generate_rows(RECIPIENTS, seed=17))
    deadline = datetime.now(UTC) + timedelta(seconds=5)  # the campaign cannot make it: the alert must say so
    spec = CampaignSpec(id=CAMPAIGN, channel="sms", body="Hi $first_name", deadline=deadline, rate=CAMPAIGN_RATE)
    api_port = free_port()
    with (
        LocalCluster(settings, workers=2, mock_args=["--faults", FAULTS], metrics_ports=ports) as cluster,
        running_api_process(cluster, api_port) as api_url,
        running_prometheus(prometheus_bin, tmp_path, [f"127.0.0.1:{p}" for p in [*ports, api_port]]) as base,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        for port in ports:
            wait_http(f"http://127.0.0.1:{port}/metrics", 30)
        wait_until("both workers and the API scraped", lambda: len(query(base, "up == 1")) == 3, 15)
        # The campaign system plans through the API (whose /metrics counts planner rejections);
        # run_campaign's own plan call then answers the same stored plan and starts it.
        assert cluster.target is not None
        token, _ = ApiKeyStore(redis.Redis.from_url(cluster.target.app_url)).create("write", "pipeline-test")
        spec_body = {"id": CAMPAIGN, "channel": "sms", "body": spec.body, "rate": CAMPAIGN_RATE}
        spec_body["deadline"] = deadline.isoformat()
        planned_by_api = DispatchClient(api_url, token).create_campaign(spec_body, recipients=rows)
        assert planned_by_api["existing"] is False and sum(planned_by_api["rejected"].values()) > 0
        started = time.monotonic()
        campaign = pool.submit(run_campaign, cluster, spec, rows, progress=False, timeout_s=60)

        wait_until(
            "campaign gauges scraped",
            lambda: has_data(
                query(base, f'count_over_time(dispatch_campaign_sent_messages{{campaign="{CAMPAIGN}"}}[1m]) > 3')
            ),
            30,
        )
        time.sleep(max(0.0, EVALUATE_AFTER_S - (time.monotonic() - started)))
        values = {**RANGES, **variable_values(base)}
        assert values["$campaign"] == grafana_escape(CAMPAIGN) == CAMPAIGN
        assert PROVIDER in values["$provider"].split("|")  # every registered provider, ours among them
        check_dashboard(base, values)
        check_alerts(base)
        # Gauges (calls in flight, queue depth) are sampled once a scrape: a scrape can fall between
        # two bursts of sends, so each series gets the rest of the campaign's first half to move.
        moved: set[str] = set()

        def all_moved() -> bool:
            moved.update(q for q in set(MUST_MOVE) - moved if any(float(r["value"][1]) > 0 for r in query(base, q)))
            return moved >= set(MUST_MOVE) - set(KNOWN_STILL)

        with contextlib.suppress(AssertionError):
            wait_until("every MUST_MOVE series to move", all_moved, 5)
        assert moved >= set(MUST_MOVE) - set(KNOWN_STILL), {q: MUST_MOVE[q] for q in set(MUST_MOVE) - moved}
        assert not moved & set(KNOWN_STILL), f"moving now, remove from KNOWN_STILL: {moved & set(KNOWN_STILL)}"
        wait_until(
            "ETA-past-deadline and 429 alerts active",
            lambda: (
                {("DispatchCampaignEtaPastDeadline", CAMPAIGN), ("DispatchProviderThrottled", PROVIDER)}
                <= active_alerts(base)
            ),
            5,
        )
        planned = query(base, f'dispatch_campaign_planned_messages{{campaign="{CAMPAIGN}"}}')
        sent = query(base, f'dispatch_campaign_sent_messages{{campaign="{CAMPAIGN}"}}')
        deadlines = query(base, f'dispatch_campaign_deadline_timestamp_seconds{{campaign="{CAMPAIGN}"}}')
        check_no_addresses(base, [*ports, api_port], rows)
        evaluated_at = time.monotonic() - started
        assert not campaign.done(), f"the campaign ended before the checks finished ({evaluated_at:.1f} s)"

        plan, status, elapsed = campaign.result(timeout=90)
        assert plan["existing"] is True and plan["accepted"] == planned_by_api["accepted"]
        assert status.complete, status.as_dict()
        assert {float(r["value"][1]) for r in planned} == {float(plan["accepted"])}
        assert {float(r["value"][1]) for r in deadlines} == {deadline.timestamp()}
        assert len(planned) == 2  # one series per worker (instance), both working on the campaign
        assert all(0 < float(r["value"][1]) < plan["accepted"] for r in sent), sent  # scraped mid-campaign
        # Its series end with it: absent from the next scrapes, so the selector empties.
        wait_until(
            "the campaign's series to disappear",
            lambda: not query(base, f'{{__name__=~"dispatch_campaign_.+",campaign="{CAMPAIGN}"}}'),
            10,
        )
        print(f"campaign {elapsed:.1f} s, checks done at {evaluated_at:.1f} s")


def test_address_patterns_catch_phones_and_emails_but_not_ports_or_ids() -> None:
    phones = ["+447400000123", "447400000123", "+1 (201) 555-0123", "tel:+4915123000001", "campaign:4474000001"]
    emails = ["ada@example.com", "a+b@x.co"]
    harmless = ["127.0.0.1:45669", "0.001", "+Inf", "mon-pipeline", "sms:AC00000000000000000000000000000000", "1.7e9"]

    assert all(_PHONE.search(v) for v in phones)
    assert all(_EMAIL.search(v) for v in emails)
    assert not any(_PHONE.search(v) or _EMAIL.search(v) for v in harmless)
