"""The load-test kit: ``dispatch loadtest`` end to end, the PNG writer, percentiles."""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from dispatch.cli import main as dispatch_main
from dispatch.config import Settings, load_settings
from dispatch.store.connect import with_db
from loadtest.chart import PNG_SIGNATURE, Canvas, Panel, Series, loadtest_panels, nice_ticks, render_chart
from loadtest.report import (
    bucket_percentile,
    diff_buckets,
    format_report,
    parse_histogram,
    percentile,
    sum_buckets,
    summarize_profile,
)
from loadtest.runner import LoadtestError, LoadtestOptions, run_loadtest, wired_channels


@pytest.fixture
def env(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    values = {
        "DISPATCH_HOME": str(tmp_path / "home"),
        "DISPATCH_REDIS_URL": with_db(redis_url, 0),
        "DISPATCH_BROKER_DB": "1",
        "DISPATCH_BATCH_SIZE": "100",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    broker_db = redis.Redis.from_url(with_db(redis_url, 1))
    broker_db.flushdb()
    yield values
    broker_db.flushdb()
    broker_db.close()


def test_loadtest_command_reports_consistent_figures(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["loadtest", "--recipients", "300", "--workers", "1", "--json", "--out", str(out)]
    assert dispatch_main(argv) == 0
    report = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert report["recipients"] == 300
    assert report["accepted"] + sum(report["rejected"].values()) == 300
    assert 250 < report["accepted"] < 300  # the generated audience has some bad rows
    assert report["sent"] == report["accepted"] == report["provider"]["accepted"] == report["provider"]["unique"]
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["failed"] == 0 and report["retries"] == 0
    assert report["complete"] and report["ok"]
    assert report["samples"], "at least the final sample"
    assert report["samples"][-1]["done"] == report["accepted"]
    assert sum(n for _, n in report["provider_per_second"]) == report["provider"]["accepted"]
    assert report["provider"]["peak_1s"] == max(n for _, n in report["provider_per_second"])
    assert report["latency_ms"]["observations"] == report["accepted"]
    p50, p95, p99 = (report["latency_ms"][q] for q in ("p50", "p95", "p99"))
    assert 0 < p50 <= p95 <= p99
    assert report["prediction"]["actual_s"] > 0 and report["prediction"]["predicted_s"] > 0
    assert report["throughput"]["mean"] == pytest.approx(report["sent"] / report["prediction"]["actual_s"], rel=0.01)
    json_file, chart_file = Path(report["json_file"]), Path(report["chart_file"])
    assert json_file.parent == chart_file.parent == out.resolve()
    assert orjson.loads(json_file.read_bytes())["campaign_id"] == report["campaign_id"]
    assert chart_file.read_bytes().startswith(PNG_SIGNATURE)
    assert "lost        0   duplicates 0" in format_report(report)
    _check_chart_data(report, chart_file)


def _check_chart_data(report: dict[str, Any], chart_file: Path) -> None:
    """The chart shows the prediction beside the run: the predicted rate and finish, and the
    cumulative sent curve against the predicted progress (the data it is drawn from)."""
    throughput, progress, latency = loadtest_panels(report)
    predicted_s, predicted_rate = report["prediction"]["predicted_s"], report["prediction"]["predicted_rate"]
    assert predicted_s > 0 and predicted_rate > 0
    by_name = {s.name: list(s.points) for s in throughput.series}
    assert by_name["PREDICTED MSG/S"] == [(0.0, predicted_rate), (predicted_s, predicted_rate)]
    assert by_name["PIPELINE MSG/S"] == [(s["t"], s["rate"]) for s in report["samples"]]
    assert [(m.name, m.x) for m in throughput.markers] == [("PREDICTED FINISH", predicted_s)]
    curves = {s.name: list(s.points) for s in progress.series}
    sent = curves["SENT"]
    assert sent[0] == (0.0, 0.0) and sent[1:] == [(s["t"], float(s["sent"])) for s in report["samples"]]
    assert all(b[1] >= a[1] for a, b in itertools.pairwise(sent)), "cumulative never goes down"
    assert sent[-1][1] == report["sent"]
    assert curves["PREDICTED"] == [(0.0, 0.0), (predicted_s, float(report["accepted"]))]
    assert progress.reference == report["accepted"] and [m.x for m in progress.markers] == [predicted_s]
    assert {s.name for s in latency.series} == {"P50 MS", "P95 MS", "P99 MS"}
    width, height, _ = _decode_png(chart_file.read_bytes())
    assert (width, height) == (1000, 50 + 3 * 360 + 20)  # the three panels were drawn


def test_bench_measures_the_raw_ceiling_on_both_sides_of_the_pipeline(
    env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--messages", "400", "--workers", "1", "--raw-seconds", "1", "--planner-rows", "0"]
    assert dispatch_main([*argv, "--json", "--out", str(tmp_path / "out")]) == 0
    summary = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before, after, pipeline = summary["raw"], summary["raw_after"], summary["pipeline"]
    assert before["rate"] > 0 and after["rate"] > 0 and before["errors"] == after["errors"] == 0
    assert summary["raw_baseline_rate"] == pytest.approx((before["rate"] + after["rate"]) / 2, abs=0.1)
    baseline = summary["raw_baseline_rate"]
    assert summary["ratio_mean"] == pytest.approx(pipeline["throughput"]["mean"] / baseline, abs=0.001)
    assert pipeline["lost"] == 0 and pipeline["duplicates"] == 0 and pipeline["ok"]
    # the pipeline's mock ledger started empty although the raw clients had posted to it first
    assert pipeline["provider"]["accepted"] == pipeline["accepted"]


def test_loadtest_sends_email_through_the_batch_api(env: dict[str, str], tmp_path: Path) -> None:
    settings = load_settings()
    if "email" not in wired_channels(settings):
        pytest.skip("email is not wired into the worker runtime")
    options = LoadtestOptions(recipients=2500, workers=1, channel="email", out_dir=tmp_path, progress=False)
    report = run_loadtest(settings, options)
    assert report["accepted"] == report["sent"] == report["provider"]["unique"] == 2500
    assert report["lost"] == 0 and report["duplicates"] == 0 and report["ok"]
    # 1,000 personalizations per request: 3 requests, each observed once per recipient
    assert report["latency_ms"]["observations"] == 2500
    assert report["cpu"]["us_per_message"]["workers"] is not None


def test_loadtest_refuses_an_unknown_channel(env: dict[str, str]) -> None:
    settings: Settings = load_settings()
    assert "sms" in wired_channels(settings)
    with pytest.raises(LoadtestError, match="unknown channel 'fax'"):
        run_loadtest(settings, LoadtestOptions(recipients=10, channel="fax", progress=False))


def _decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Minimal decoder for what Canvas writes: IHDR, one IDAT, filter 0 rows, 8-bit RGB."""
    assert data.startswith(PNG_SIGNATURE)
    pos, chunks = len(PNG_SIGNATURE), {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour_type) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    rows = [raw[i * stride : (i + 1) * stride] for i in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def test_png_writer_encodes_the_pixels_drawn() -> None:
    canvas = Canvas(40, 20)
    canvas.line(0, 0, 39, 19, (255, 0, 0))
    canvas.rect(30, 2, 33, 4, (0, 0, 255))
    canvas.text(2, 12, "7", (0, 128, 0))
    width, height, rows = _decode_png(canvas.png())
    assert (width, height) == (40, 20)

    def px(x: int, y: int) -> tuple[int, ...]:
        return tuple(rows[y][3 * x : 3 * x + 3])

    assert px(0, 0) == px(39, 19) == (255, 0, 0)
    assert px(20, 10) == (255, 0, 0) or px(19, 10) == (255, 0, 0)  # the diagonal passes the middle
    assert px(31, 3) == (0, 0, 255)
    assert px(2, 12) == px(4, 12) == (0, 128, 0)  # the top bar of the 7
    assert px(39, 0) == (255, 255, 255)
    assert canvas.pixel(31, 3) == (0, 0, 255)


def test_render_chart_writes_a_png_with_the_series(tmp_path: Path) -> None:
    path = render_chart(
        tmp_path / "c.png",
        [
            Panel("RATE", [Series("A", [(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)], (10, 20, 30))], reference=2.5),
            Panel("LATENCY", [Series("P50", [(0.0, math.nan), (1.0, 5.0)], (40, 50, 60))]),
        ],
        title="T",
        width=300,
    )
    width, _, rows = _decode_png(path.read_bytes())
    assert width == 300
    colours = {bytes(row[i : i + 3]) for row in rows for i in range(0, len(row), 3)}
    assert bytes((10, 20, 30)) in colours and bytes((40, 50, 60)) in colours and bytes((200, 0, 0)) in colours


def test_nice_ticks_cover_the_range_in_round_steps() -> None:
    assert nice_ticks(0, 4800) == [0, 1000, 2000, 3000, 4000, 5000]
    assert nice_ticks(0, 0.9) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.95) == 7.0
    assert math.isnan(percentile([], 0.5))
    with pytest.raises(ValueError):
        percentile(values, 1.5)


def test_bucket_percentile_matches_histogram_quantile() -> None:
    buckets = [(0.1, 50.0), (0.2, 100.0), (0.5, 100.0), (math.inf, 100.0)]
    assert bucket_percentile(buckets, 0.5) == pytest.approx(0.1)
    assert bucket_percentile(buckets, 0.75) == pytest.approx(0.15)
    assert bucket_percentile(buckets, 0.25) == pytest.approx(0.05)
    # ranks that fall in the +Inf bucket answer the highest finite bound, as PromQL does
    assert bucket_percentile([(0.1, 10.0), (math.inf, 20.0)], 0.99) == pytest.approx(0.1)
    assert math.isnan(bucket_percentile([(0.1, 0.0), (math.inf, 0.0)], 0.5))


def test_histograms_are_parsed_summed_and_differenced() -> None:
    text = "\n".join(
        [
            "# HELP dispatch_send_latency_seconds Provider call latency.",
            "# TYPE dispatch_send_latency_seconds histogram",
            'dispatch_send_latency_seconds_bucket{le="0.01",provider="twilio"} 3.0',
            'dispatch_send_latency_seconds_bucket{le="+Inf",provider="twilio"} 5.0',
            'dispatch_send_latency_seconds_bucket{le="0.01",provider="sendgrid"} 1.0',
            'dispatch_send_latency_seconds_bucket{le="+Inf",provider="sendgrid"} 1.0',
            "dispatch_send_latency_seconds_count 6.0",
            'dispatch_ratelimit_wait_seconds_bucket{le="0.01",provider="twilio"} 99.0',
        ]
    )
    buckets = parse_histogram(text)
    assert buckets == [(0.01, 4.0), (math.inf, 6.0)]
    both = sum_buckets([buckets, buckets])
    assert both == [(0.01, 8.0), (math.inf, 12.0)]
    assert diff_buckets(both, buckets) == buckets


def test_profile_summary_ranks_self_inclusive_and_packages() -> None:
    collapsed = "\n".join(
        [
            "Thread.run (threading.py:982);Engine.send (dispatch/engine.py:10);post (aiohttp/client.py:5) 6",
            "Thread.run (threading.py:982);Engine.send (dispatch/engine.py:11) 3",
            "Thread.run (threading.py:982);iter (/x/site-packages/tenacity/__init__.py:7) 1",
            "not a stack line",
        ]
    )
    summary = summarize_profile(collapsed)
    assert summary["samples"] == 10
    assert summary["self"] == [("post (aiohttp/client.py)", 0.6), ("Engine.send (dispatch/engine.py)", 0.3),
                               ("iter (tenacity/__init__.py)", 0.1)]  # fmt: skip
    assert summary["inclusive"][0] == ("Thread.run (threading.py)", 1.0)
    assert summary["ours"] == [("Engine.send (dispatch/engine.py)", 0.9)]
    assert dict(summary["packages"]) == {"threading": 1.0, "dispatch": 0.9, "aiohttp": 0.6, "tenacity": 0.1}


def test_a_prediction_matrix_case_reports_range_and_live_eta_and_the_workers_leave_evidence(
    env: dict[str, str], redis_url: str
) -> None:
    from dispatch.plan.evidence import EvidenceStore
    from loadtest.bench_predict import Case, parse_cases, run_case

    settings = load_settings()
    row = run_case(settings, "tiny", Case(recipients=3000, workers=1))
    assert row["ok"] and row["lost"] == 0 and row["duplicates"] == 0
    low, high = row["range_s"]
    assert low < row["predicted_s"] < high
    assert row["inside_range"] == (low <= row["actual_s"] <= high)
    assert row["error_pct"] == pytest.approx((row["predicted_s"] - row["actual_s"]) / row["actual_s"] * 100, abs=0.1)
    assert row["eta10_at_s"] is not None and row["eta10_source"] in {"live", "ramp", "plan"}
    assert row["eta10_error_pct"] is not None
    # the worker folded its sends into the deployment's evidence (its last window on stop)
    client = redis.Redis.from_url(with_db(redis_url, 0))
    try:
        evidence = EvidenceStore(client).read("sms", "twilio")
    finally:
        client.close()
    assert evidence is not None and evidence.stats["latency_s"].n >= 1 and evidence.stats["workers"].mean >= 1
    with pytest.raises(LoadtestError, match="unknown case"):
        parse_cases("sms-20k,fax-1")
    assert parse_cases(None) == ["sms-20k", "sms-200k", "sms-1m", "email-300k", "capped", "latency"]
