"""Metrics API in one process: values through the registry, label checks, no address labels."""

from __future__ import annotations

import math
import re

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from monitoring.errors import LabelValueError
from monitoring.metrics import (
    BATCH_STATES,
    CALLBACK_REJECT_REASONS,
    CAMPAIGN_GAUGES,
    LATENCY_BUCKETS,
    OUTCOMES,
    RETRY_CAUSES,
    Metrics,
)

#: Label names a metric may carry (``le`` is the histogram bucket bound).
ALLOWED_LABELS = {
    "channel",
    "provider",
    "outcome",
    "cause",
    "reason",
    "state",
    "queue",
    "limiter",
    "campaign",
    "event",
    "resolution",
    "action",
}
#: Fragments of label names that would mean recipient data.
ADDRESS_LIKE = re.compile(r"phone|email|e_mail|mail|token|address|addr|recipient|msisdn|number|user|to$")
PHONE_VALUE = re.compile(r"\+?\d{7,15}")
EMAIL_VALUE = re.compile(r"[^@\s]+@[^@\s]+")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def exercise_everything(m: Metrics) -> None:
    """Call every recording method once, so every metric family has samples."""
    m.register_provider("sms", "twilio")
    m.register_queue("dispatch.sms")
    m.register_planner_reasons(["invalid_phone", "stale"])
    m.record_send("sms", "twilio", "sent", n=5)
    m.observe_latency("twilio", 0.02)
    m.record_retry("twilio", "http_429")
    m.record_dedup_hit("sms")
    with m.inflight("twilio"):
        pass
    m.observe_ratelimit_wait("twilio", 0.3)
    m.set_ratelimit_rate("sms:AC0123456789abcdef0123456789abcdef", 80.0, 100.0)
    m.set_queue_depth("dispatch.sms", 12)
    m.record_batch("completed")
    m.record_dead_letter("dispatch.sms")
    m.heartbeat()
    m.record_callback("twilio")
    m.record_callback_rejected("twilio", "bad_signature")
    m.record_planner_rejections("invalid_phone", n=3)
    m.record_breaker_transition("twilio", "opened")
    m.record_in_doubt("twilio", "found", 2)
    m.record_sweep("requeued", 3)
    m.record_redis_restart()
    m.set_campaign_progress(
        "spring-sale",
        sent=10,
        total=100,
        predicted_finish_ts=2_000.0,
        estimated_finish_ts=2_100.0,
        deadline_ts=2_050.0,
        paused=False,
        predicted_range_ts=(1_900.0, 2_150.0),
    )
    m.set_engagement("spring-sale", "email", {"delivered": 90, "human_opens": 30, "clicks": 4})


def test_record_send_counts_per_channel_provider_outcome(metrics: Metrics) -> None:
    metrics.record_send("sms", "twilio", "sent", n=3)
    metrics.record_send("sms", "twilio", "sent")
    metrics.record_send("email", "sendgrid", "dead_lettered", n=2)

    assert value(metrics, "dispatch_messages_total", channel="sms", provider="twilio", outcome="sent") == 4
    assert value(metrics, "dispatch_messages_total", channel="email", provider="sendgrid", outcome="dead_lettered") == 2
    assert value(metrics, "dispatch_messages_total", channel="sms", provider="twilio", outcome="failed") is None


def test_register_provider_creates_zero_series(metrics: Metrics) -> None:
    metrics.register_provider("push", "fcm")

    for outcome in OUTCOMES:
        assert value(metrics, "dispatch_messages_total", channel="push", provider="fcm", outcome=outcome) == 0
    for cause in RETRY_CAUSES:
        assert value(metrics, "dispatch_send_retries_total", provider="fcm", cause=cause) == 0
    for reason in CALLBACK_REJECT_REASONS:
        assert value(metrics, "dispatch_callbacks_rejected_total", provider="fcm", reason=reason) == 0
    assert value(metrics, "dispatch_send_latency_seconds_count", provider="fcm") == 0
    assert value(metrics, "dispatch_inflight_sends", provider="fcm") == 0


def test_latency_buckets_span_1ms_to_30s(metrics: Metrics) -> None:
    assert LATENCY_BUCKETS[0] == 0.001
    assert LATENCY_BUCKETS[-1] == 30.0
    metrics.observe_latency("twilio", 0.004)
    metrics.observe_latency("twilio", 12.0)

    assert value(metrics, "dispatch_send_latency_seconds_bucket", provider="twilio", le="0.0025") == 0
    assert value(metrics, "dispatch_send_latency_seconds_bucket", provider="twilio", le="0.005") == 1
    assert value(metrics, "dispatch_send_latency_seconds_bucket", provider="twilio", le="10.0") == 1
    assert value(metrics, "dispatch_send_latency_seconds_bucket", provider="twilio", le="30.0") == 2
    assert value(metrics, "dispatch_send_latency_seconds_sum", provider="twilio") == pytest.approx(12.004)


def test_retries_by_cause(metrics: Metrics) -> None:
    metrics.record_retry("twilio", "http_429", n=2)
    metrics.record_retry("twilio", "timeout")

    assert value(metrics, "dispatch_send_retries_total", provider="twilio", cause="http_429") == 2
    assert value(metrics, "dispatch_send_retries_total", provider="twilio", cause="timeout") == 1


def test_inflight_tracks_the_block_even_when_it_raises(metrics: Metrics) -> None:
    with metrics.inflight("twilio", n=3):
        assert value(metrics, "dispatch_inflight_sends", provider="twilio") == 3
        with metrics.inflight("twilio"):
            assert value(metrics, "dispatch_inflight_sends", provider="twilio") == 4
    assert value(metrics, "dispatch_inflight_sends", provider="twilio") == 0

    with pytest.raises(RuntimeError), metrics.inflight("twilio"):
        raise RuntimeError("provider exploded")
    assert value(metrics, "dispatch_inflight_sends", provider="twilio") == 0


def test_rate_limiter_wait_and_adaptive_rate(metrics: Metrics) -> None:
    metrics.observe_ratelimit_wait("twilio", 0.0)
    metrics.observe_ratelimit_wait("twilio", 0.7)
    metrics.set_ratelimit_rate("sms:AC01", 50.0, 100.0)
    metrics.set_ratelimit_rate("sms:AC01", 60.0)

    assert value(metrics, "dispatch_ratelimit_wait_seconds_count", provider="twilio") == 2
    assert value(metrics, "dispatch_ratelimit_wait_seconds_bucket", provider="twilio", le="0.5") == 1
    assert value(metrics, "dispatch_ratelimit_rate", limiter="sms:AC01") == 60
    assert value(metrics, "dispatch_ratelimit_configured_rate", limiter="sms:AC01") == 100


def test_queues_batches_dead_letters_heartbeat(metrics: Metrics) -> None:
    metrics.set_queue_depth("dispatch.sms", 40)
    metrics.set_queue_depth("dispatch.sms", 25)
    metrics.record_batch("completed", n=2)
    metrics.record_dead_letter("dispatch.sms")
    metrics.heartbeat(now=1_700_000_000.0)

    assert value(metrics, "dispatch_queue_depth", queue="dispatch.sms") == 25
    for state in BATCH_STATES:
        expected = 2 if state == "completed" else 0
        assert value(metrics, "dispatch_batches_total", state=state) == expected
    assert value(metrics, "dispatch_dead_letters_total", queue="dispatch.sms") == 1
    assert value(metrics, "dispatch_worker_heartbeat_timestamp_seconds") == 1_700_000_000.0


def test_callbacks_planner_and_dedup(metrics: Metrics) -> None:
    metrics.record_callback("sendgrid", n=10)
    metrics.record_callback_rejected("sendgrid", "bad_signature", n=2)
    metrics.register_planner_reasons(["stale"])
    metrics.record_planner_rejections("invalid_phone", n=7)
    metrics.record_dedup_hit("email", n=4)

    assert value(metrics, "dispatch_callbacks_received_total", provider="sendgrid") == 10
    assert value(metrics, "dispatch_callbacks_rejected_total", provider="sendgrid", reason="bad_signature") == 2
    assert value(metrics, "dispatch_planner_rejections_total", reason="stale") == 0
    assert value(metrics, "dispatch_planner_rejections_total", reason="invalid_phone") == 7
    assert value(metrics, "dispatch_dedup_hits_total", channel="email") == 4


def test_campaign_progress_and_end_campaign_removes_its_series(metrics: Metrics) -> None:
    metrics.set_campaign_progress(
        "c-1",
        sent=10,
        total=100,
        predicted_finish_ts=500.0,
        estimated_finish_ts=650.0,
        deadline_ts=600.0,
        predicted_range_ts=(470.0, 560.0),
    )
    metrics.set_campaign_progress("c-2", sent=1, total=2, deadline_ts=900.0, paused=True)

    assert value(metrics, "dispatch_campaign_sent_messages", campaign="c-1") == 10
    assert value(metrics, "dispatch_campaign_planned_messages", campaign="c-1") == 100
    assert value(metrics, "dispatch_campaign_predicted_finish_timestamp_seconds", campaign="c-1") == 500
    assert value(metrics, "dispatch_campaign_estimated_finish_timestamp_seconds", campaign="c-1") == 650
    assert value(metrics, "dispatch_campaign_deadline_timestamp_seconds", campaign="c-1") == 600
    assert value(metrics, "dispatch_campaign_predicted_finish_low_timestamp_seconds", campaign="c-1") == 470
    assert value(metrics, "dispatch_campaign_predicted_finish_high_timestamp_seconds", campaign="c-1") == 560
    assert value(metrics, "dispatch_campaign_predicted_finish_low_timestamp_seconds", campaign="c-2") is None
    assert value(metrics, "dispatch_campaign_paused", campaign="c-1") == 0
    assert value(metrics, "dispatch_campaign_paused", campaign="c-2") == 1
    # No estimate given: the series is absent rather than a made-up number.
    assert value(metrics, "dispatch_campaign_estimated_finish_timestamp_seconds", campaign="c-2") is None

    metrics.end_campaign("c-1")

    for name in CAMPAIGN_GAUGES:
        assert value(metrics, name, campaign="c-1") is None, name
    assert value(metrics, "dispatch_campaign_sent_messages", campaign="c-2") == 1
    metrics.end_campaign("c-1")  # ending twice is harmless


def test_a_later_update_without_an_estimate_drops_the_old_estimate(metrics: Metrics) -> None:
    metrics.set_campaign_progress("c-1", sent=1, total=10, estimated_finish_ts=700.0)
    metrics.set_campaign_progress("c-1", sent=2, total=10, estimated_finish_ts=None)

    assert value(metrics, "dispatch_campaign_estimated_finish_timestamp_seconds", campaign="c-1") is None
    assert value(metrics, "dispatch_campaign_sent_messages", campaign="c-1") == 2


@pytest.mark.parametrize(
    ("call", "label"),
    [
        (lambda m: m.record_send("sms", "twilio", "delivered"), "outcome"),
        (lambda m: m.record_retry("twilio", "http_400"), "cause"),
        (lambda m: m.record_send("SMS", "twilio", "sent"), "channel"),
        (lambda m: m.record_send("sms", "twilio inc", "sent"), "provider"),
        (lambda m: m.record_callback_rejected("twilio", "bad signature from +15551234567"), "reason"),
        (lambda m: m.record_planner_rejections("x" * 41), "reason"),
        (lambda m: m.set_campaign_progress("bob@example.com", sent=0, total=1), "campaign"),
        (lambda m: m.set_campaign_progress("+15551234567", sent=0, total=1), "campaign"),
        (lambda m: m.end_campaign(""), "campaign"),
        (lambda m: m.set_ratelimit_rate("sms:sender:15551234567", 1.0), "limiter"),
        (lambda m: m.set_ratelimit_rate("sms:+15551234567", 1.0), "limiter"),
        (lambda m: m.set_ratelimit_rate("email:bob@example.com", 1.0), "limiter"),
        (lambda m: m.set_queue_depth("queue with spaces", 1), "queue"),
        (lambda m: m.record_batch("Done!"), "state"),
    ],
)
def test_bad_label_values_are_refused_without_echoing_them(call, label: str, metrics: Metrics) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LabelValueError) as caught:
        call(metrics)
    assert caught.value.label == label
    assert "5551234567" not in str(caught.value)
    assert "example.com" not in str(caught.value)


def test_account_id_limiter_keys_are_accepted(metrics: Metrics) -> None:
    metrics.set_ratelimit_rate("sms:AC0123456789abcdef0123456789abcdef", 100.0)
    metrics.set_ratelimit_rate("push:fcm:my-project", 10_000.0)

    assert value(metrics, "dispatch_ratelimit_rate", limiter="sms:AC0123456789abcdef0123456789abcdef") == 100


def test_no_metric_label_can_carry_an_address(metrics: Metrics) -> None:
    exercise_everything(metrics)

    families = [f for f in metrics.registry.collect() if f.name.startswith("dispatch_")]
    assert len(families) >= 20
    for family in families:
        assert family.samples, f"{family.name} has no samples: exercise_everything misses it"
        for sample in family.samples:
            for name, label_value in sample.labels.items():
                if name == "le":
                    continue
                assert not ADDRESS_LIKE.search(name), f"{family.name} has address-like label {name!r}"
                assert name in ALLOWED_LABELS, f"{family.name} has unexpected label {name!r}"
                assert not EMAIL_VALUE.search(label_value), f"{family.name}{{{name}}} holds an email"
                for part in label_value.split(":"):
                    assert not PHONE_VALUE.fullmatch(part), f"{family.name}{{{name}}} holds a phone"


def test_metrics_stay_off_the_default_registry_and_two_instances_coexist() -> None:
    first = Metrics(CollectorRegistry())
    second = Metrics(CollectorRegistry())
    first.record_send("sms", "twilio", "sent")

    default_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("dispatch_") for name in default_names)
    assert value(first, "dispatch_messages_total", channel="sms", provider="twilio", outcome="sent") == 1
    assert value(second, "dispatch_messages_total", channel="sms", provider="twilio", outcome="sent") is None
    assert not first.multiprocess


def test_heartbeat_defaults_to_now(metrics: Metrics) -> None:
    import time

    before = time.time()
    metrics.heartbeat()
    stamp = value(metrics, "dispatch_worker_heartbeat_timestamp_seconds")
    assert stamp is not None
    assert not math.isnan(stamp)
    assert before <= stamp <= time.time()


async def test_queue_depths_come_from_a_real_dramatiq_broker(redis_url: str, aredis_client) -> None:  # type: ignore[no-untyped-def]
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    from monitoring.metrics import collect_queue_depths

    broker = RedisBroker(url=redis_url, namespace="test-broker", middleware=[])
    try:
        broker.declare_queue("dispatch.sms")
        for n in range(3):
            broker.enqueue(
                dramatiq.Message(queue_name="dispatch.sms", actor_name="a", args=(n,), kwargs={}, options={})
            )
        delayed = dramatiq.Message(queue_name="dispatch.sms", actor_name="a", args=(9,), kwargs={}, options={})
        broker.enqueue(delayed, delay=60_000)
    finally:
        broker.close()
    metrics = Metrics(CollectorRegistry())

    depths = await collect_queue_depths(metrics, aredis_client, ["dispatch.sms"], namespace="test-broker")

    assert depths == {"dispatch.sms": 3, "dispatch.sms.DQ": 1}
    assert value(metrics, "dispatch_queue_depth", queue="dispatch.sms") == 3
    assert value(metrics, "dispatch_queue_depth", queue="dispatch.sms.DQ") == 1
