"""The dashboard and the alert rules query only metrics the code defines, and Prometheus accepts them.

Every PromQL expression is extracted from ``monitoring/grafana/dispatch.json`` and
``monitoring/prometheus/alerts.yml``; each metric name it references must be one ``Metrics``
exposes, each label it groups or filters by must be one the metrics carry, and every ``Metrics``
family must appear on the dashboard. ``promtool`` (Debian package ``prometheus``) checks the
rules, the example config and, as recording rules, the dashboard's expressions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitoring.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "monitoring" / "grafana" / "dispatch.json"
ALERTS = REPO / "monitoring" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "monitoring" / "prometheus" / "prometheus.yml"

#: Labels the expressions may use: ours, histogram buckets, and what Prometheus/multiprocess add.
KNOWN_LABELS = {
    "channel",
    "provider",
    "outcome",
    "cause",
    "reason",
    "state",
    "queue",
    "limiter",
    "event",
    "campaign",
    "resolution",
    "action",
    "le",
    "pid",
    "instance",
    "job",
}
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
}
#: Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$campaign": ".*",
    "$provider": ".*",
}


# -- extraction ------------------------------------------------------------------------------


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target, including panels nested in rows."""
    dashboard = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []) or []:  # type: ignore[attr-defined]
                found.append((str(panel["title"]), target["expr"]))
            walk(panel.get("panels", []) or [])  # type: ignore[arg-type]

    walk(dashboard["panels"])
    return found


def dashboard_variable_metrics() -> list[tuple[str, str]]:
    """(variable, metric) for every ``label_values(metric, label)`` template query."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        found.append((variable["name"], match.group(1)))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expr) from alerts.yml: single-line ``expr:`` values and ``|``/``>`` blocks."""
    lines = ALERTS.read_text().splitlines()
    found: list[tuple[str, str]] = []
    alert = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if match := re.match(r"\s*- alert:\s*(\S+)", line):
            alert = match.group(1)
        if match := re.match(r"(\s*)expr:\s*(.*)$", line):
            indent, rest = len(match.group(1)), match.group(2).strip()
            if rest in ("|", "|-", ">", ">-"):
                block = []
                i += 1
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    block.append(lines[i].strip())
                    i += 1
                found.append((alert, " ".join(part for part in block if part)))
                continue
            found.append((alert, rest))
        i += 1
    return found


def substitute(expr: str) -> str:
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace("${" + variable[1:] + "}", replacement).replace(variable, replacement)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def referenced_metrics(expr: str) -> list[str]:
    """Metric names an expression selects (identifiers that are not functions or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = []
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        if match.group(1).lower() in PROMQL_KEYWORDS:
            continue
        names.append(match.group(1))
    return names


def referenced_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    return labels


def exposed_metrics() -> dict[str, str]:
    """Every sample name ``Metrics`` can expose, mapped to its family name."""
    names: dict[str, str] = {}
    for family in Metrics(CollectorRegistry()).registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


def all_expressions() -> list[tuple[str, str]]:
    return [(f"dashboard: {t}", e) for t, e in dashboard_expressions()] + [
        (f"alert: {a}", e) for a, e in alert_expressions()
    ]


# -- promtool --------------------------------------------------------------------------------


def find_or_install_prometheus() -> tuple[str | None, str]:
    """(directory holding promtool and prometheus, or None; why not)."""
    for candidate in (shutil.which("promtool"), "/usr/bin/promtool"):
        if candidate and Path(candidate).exists() and Path(candidate).with_name("prometheus").exists():
            return str(Path(candidate).parent), ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "promtool not found and cannot install the Debian package prometheus (not root/no apt)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
    try:
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=120, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=240, check=False)
    except subprocess.TimeoutExpired:
        return None, "installing the Debian package prometheus timed out"
    if done.returncode != 0 or not Path("/usr/bin/promtool").exists():
        return None, f"apt-get install prometheus failed: {done.stderr.strip()[-300:]}"
    return "/usr/bin", ""


@pytest.fixture(scope="session")
def prometheus_bin() -> Iterator[Path]:
    found, why = find_or_install_prometheus()
    if found is None:
        pytest.skip(why)
    yield Path(found)


def promtool(prometheus_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(prometheus_bin / "promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


# -- tests -----------------------------------------------------------------------------------


def test_extraction_finds_every_expression() -> None:
    alert_count = sum(1 for line in ALERTS.read_text().splitlines() if re.match(r"\s*- alert:", line))
    target_count = DASHBOARD.read_text().count('"expr":')

    assert len(alert_expressions()) == alert_count >= 9
    assert len(dashboard_expressions()) == target_count >= 30
    assert all(expr.strip() for _, expr in all_expressions())


#: Series Prometheus itself records for every target (alerts may use them).
PROMETHEUS_SERIES = frozenset({"up"})


def test_every_referenced_metric_exists_in_metrics() -> None:
    exposed = exposed_metrics()
    for where, expr in all_expressions():
        names = referenced_metrics(substitute(expr))
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = [name for name in names if name not in exposed and name not in PROMETHEUS_SERIES]
        assert not unknown, f"{where}: {unknown} not defined by monitoring.Metrics"
    for variable, metric in dashboard_variable_metrics():
        assert metric in exposed, f"template variable {variable}: {metric} not defined by Metrics"


def test_every_referenced_label_exists() -> None:
    for where, expr in all_expressions():
        unknown = referenced_labels(expr) - KNOWN_LABELS
        assert not unknown, f"{where}: unknown labels {unknown}"


def test_every_metric_family_is_on_the_dashboard() -> None:
    exposed = exposed_metrics()
    shown = {exposed[name] for _, expr in dashboard_expressions() for name in referenced_metrics(substitute(expr))}

    assert set(exposed.values()) - shown == set()


def test_reference_extraction_is_strict() -> None:
    # The checker itself must see a typo and must not mistake functions or labels for metrics.
    expr = 'sum by (provider) (rate(dispatch_mesages_total{outcome="sent"}[5m])) > 1e3 offset 5m'
    assert referenced_metrics(expr) == ["dispatch_mesages_total"]
    assert referenced_labels(expr) == {"provider", "outcome"}
    assert "dispatch_mesages_total" not in exposed_metrics()


def test_dashboard_is_provisionable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["campaign"]["type"] == "query"
    assert "__inputs" not in dashboard  # import-only placeholders break file provisioning
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert len(rows) == 8
    for word in ("Overview", "Campaign", "Provider", "Rate limit", "Queues", "Planner", "Engagement", "Delivery"):
        assert any(word.lower() in row.lower() for row in rows), word
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    campaign_panels = [e for t, e in dashboard_expressions() if "$campaign" in e]
    assert len(campaign_panels) >= 6


def test_promtool_accepts_the_alert_rules(prometheus_bin: Path) -> None:
    done = promtool(prometheus_bin, "check", "rules", str(ALERTS))

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_expressions())} rules found" in done.stdout


def test_promtool_accepts_the_example_config(prometheus_bin: Path) -> None:
    done = promtool(prometheus_bin, "check", "config", str(PROMETHEUS_CONFIG))

    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_parses_every_dashboard_expression(prometheus_bin: Path, tmp_path: Path) -> None:
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_, expr) in enumerate(dashboard_expressions()):
        rules += [f"      - record: dashboard:expr_{n}", f"        expr: {json.dumps(substitute(expr))}"]
    (tmp_path / "dashboard.yml").write_text("\n".join(rules) + "\n")

    done = promtool(prometheus_bin, "check", "rules", str(tmp_path / "dashboard.yml"))

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(dashboard_expressions())} rules found" in done.stdout


def test_promtool_rejects_a_broken_rule(prometheus_bin: Path, tmp_path: Path) -> None:
    # Proof that the checks above can fail.
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(x[5m])\n")

    assert promtool(prometheus_bin, "check", "rules", str(bad)).returncode != 0


# -- a real Prometheus scraping running workers ----------------------------------------------

#: Stand-in workers until the end-to-end pipeline can run under test: a supervisor set up as
#: ``dispatch worker --metrics-port`` is, with two forked processes emitting what a campaign's
#: workers emit. It checks the dashboard against multiprocess exposition, not the engine.
SIMULATED_WORKERS = """
import multiprocessing, os, random, sys, time
from pathlib import Path

import prometheus_client
from monitoring.exposition import setup_multiprocess, start_metrics_server
from monitoring.metrics import Metrics


def worker(index: int) -> None:
    m = Metrics(prometheus_client.CollectorRegistry())
    m.register_provider("sms", "twilio")
    m.register_queue("dispatch.sms")
    m.register_planner_reasons(["invalid_phone", "stale"])
    start = time.time()
    sent = 0
    parent = os.getppid()
    while os.getppid() == parent:
        now = time.time()
        m.heartbeat()
        with m.inflight("twilio"):
            m.observe_ratelimit_wait("twilio", random.uniform(0, 0.2))
            m.observe_latency("twilio", random.uniform(0.01, 0.3))
            m.record_send("sms", "twilio", "sent", n=10)
        sent += 10
        m.record_retry("twilio", random.choice(["timeout", "http_429"]))
        m.record_send("sms", "twilio", "retried")
        m.record_batch("completed")
        m.record_callback("twilio", n=8)
        m.set_ratelimit_rate("sms:AC0123456789abcdef0123456789abcdef", 80.0 + index, 100.0)
        m.set_queue_depth("dispatch.sms", random.randint(0, 50))
        m.record_planner_rejections("invalid_phone")
        m.record_breaker_transition("twilio", random.choice(["opened", "closed"]))
        m.record_in_doubt("twilio", random.choice(["found", "not_found"]))
        m.record_sweep("requeued")
        m.record_redis_restart()
        m.set_campaign_progress(
            "spring-sale",
            sent=sent * 2,
            total=100_000,
            predicted_finish_ts=start + 600,
            estimated_finish_ts=now + 700,
            deadline_ts=start + 900,
            predicted_range_ts=(start + 560, start + 680),
        )
        m.set_engagement(
            "spring-sale",
            "email",
            {"sent": sent, "delivered": sent - 5, "human_opens": sent // 4, "machine_opens": 3, "clicks": sent // 20},
        )
        time.sleep(0.2)


if __name__ == "__main__":
    directory, port = Path(sys.argv[1]), int(sys.argv[2])
    setup_multiprocess(directory)
    server = start_metrics_server(port, directory)
    workers = [multiprocessing.get_context("fork").Process(target=worker, args=(i,), daemon=True) for i in (0, 1)]
    for w in workers:
        w.start()
    print("ready", flush=True)
    for w in workers:
        w.join()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > end:
                raise
        time.sleep(0.2)


def api(base: str, path: str, **params: str) -> dict[str, object]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
        return json.loads(exc.read())  # type: ignore[no-any-return]


@contextlib.contextmanager
def running_prometheus(prometheus_bin: Path, tmp_path: Path, targets: list[str]) -> Iterator[str]:
    """A Prometheus on 127.0.0.1 scraping ``targets`` every second, with our alert rules loaded."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
        "scrape_configs:\n  - job_name: dispatch\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            str(prometheus_bin / "prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.console.templates=/nonexistent",
            "--web.console.libraries=/nonexistent",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/-/ready", 30)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_for_scrapes(base: str, metric: str, samples: int, deadline_s: float) -> None:
    """Wait until every target is up and ``metric`` has ``samples`` points in the last minute."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        reply = api(base, "/api/v1/query", query=f"min(count_over_time({metric}[1m]))")
        result = reply.get("data", {}).get("result", [])  # type: ignore[union-attr]
        if result and float(result[0]["value"][1]) >= samples:
            return
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not collect {samples} samples of {metric} in {deadline_s} s")


def evaluate_everything(base: str) -> None:
    """Every dashboard expression returns data; every alert expression evaluates without error."""
    empty = []
    for where, expr in dashboard_expressions():
        query = substitute(expr).replace("[1m]", "[15s]").replace("[1h]", "[1m]")
        reply = api(base, "/api/v1/query", query=query)
        assert reply["status"] == "success", f"{where}: {expr!r}: {reply}"
        result = reply["data"]["result"]  # type: ignore[index]
        values = [float(r["value"][1]) for r in result]
        if not values or all(math.isnan(v) for v in values):
            empty.append(f"{where}: {query}")
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)

    for alert, expr in alert_expressions():
        reply = api(base, "/api/v1/query", query=expr)
        assert reply["status"] == "success", f"{alert}: {reply}"
    rules = api(base, "/api/v1/rules")
    loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]  # type: ignore[index]
    assert len(loaded) == len(alert_expressions())
    for rule in loaded:
        assert rule["health"] in ("ok", "unknown"), rule
        assert not rule.get("lastError"), rule


def test_prometheus_scrapes_simulated_workers_and_every_expression_has_data(
    prometheus_bin: Path, tmp_path: Path
) -> None:
    script = tmp_path / "workers.py"
    script.write_text(SIMULATED_WORKERS)
    metrics_port = free_port()
    workers = subprocess.Popen(
        [sys.executable, "-W", "error", str(script), str(tmp_path / "prom"), str(metrics_port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: teardown stops the forked workers too
    )
    try:
        assert workers.stdout is not None
        assert workers.stdout.readline().strip() == "ready"
        with running_prometheus(prometheus_bin, tmp_path, [f"127.0.0.1:{metrics_port}"]) as base:
            wait_for_scrapes(base, "dispatch_campaign_sent_messages", samples=5, deadline_s=30)
            evaluate_everything(base)
    finally:
        os.killpg(workers.pid, signal.SIGTERM)
        workers.wait(timeout=10)
        workers.stdout.close()  # type: ignore[union-attr]
