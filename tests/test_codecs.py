"""The stored forms read and written through one codec each: the manifest, snapshot rows and
message records. Literal bytes below are what earlier code wrote; they must keep reading, and
what is written now must be what the previous code wrote."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import redis

from dispatch.campaign import CampaignSpec
from dispatch.config import load_settings
from dispatch.plan.manifest import OMITTED_WHEN_UNSET, Manifest, ManifestError
from dispatch.plan.planner import Planner
from dispatch.plan.snapshot import (
    SnapshotRow,
    batch_row,
    decode_batch,
    decode_open_row,
    decode_row,
    encode_open_row,
    extend_retention,
    load_manifest,
)
from dispatch.send.tracking import GroupRecord, MessageRecord, record_value
from dispatch.store import keys

#: A manifest as the planner wrote it before this codec (keys in its order, nullable ones null).
PLANNER_MANIFEST = (
    b'{"campaign_id":"old-1","fingerprint":"f00d","channel":"sms","body":"Hi $first_name","subject":null,'
    b'"rate":5,"deadline":null,"total":3,"accepted":2,"rejected":{"invalid_phone":1},"batches":1,'
    b'"batch_size":500,"cost_units":2,"checksum":"abc","audience_digest":"d1","snapshot_bytes":90,'
    b'"created_at":1000.5,"watermark":1000.5,"policy":{"max_staleness_s":null,"frequency_cap":null},'
    b'"config_hash":"0123456789abcdef","schedule":[{"not_before":1000.5,"recipients":2,"batches":1}],'
    b'"dedup":{"memory_bytes":1024,"spilled":false,"deferred_rows":0},"expires_at":2000.5,'
    b'"prediction":{"messages":2,"duration_s":0.4,"verdict":"no_deadline"},'
    b'"rejected_file":"/tmp/old-1.rejected.csv","rejected_unlisted":0}'
)
#: The first manifests ever written: no digest, watermark, policy, expiry, ... (still readable).
FIRST_MANIFEST = (
    b'{"campaign_id":"old-0","fingerprint":"f00d","channel":"email","body":"Hello","subject":"Hi",'
    b'"rate":null,"deadline":1500.0,"total":1,"accepted":1,"rejected":{},"batches":1,"batch_size":500,'
    b'"cost_units":1,"checksum":"abc","snapshot_bytes":40,"created_at":1000.0,'
    b'"prediction":{"messages":1,"duration_s":0.2,"verdict":"fits"},"rejected_file":"/tmp/old-0.rejected.csv"}'
)
#: A triggered campaign's manifest, with the audience_source the API appends to a planned one
#: and a key from a newer writer.
TRIGGERED_MANIFEST = (
    b'{"campaign_id":"t:sms-2026010100","kind":"triggered","fingerprint":"triggered","channel":"sms",'
    b'"body":"$body","subject":null,"rate":null,"deadline":null,"total":0,"accepted":1,"rejected":{},'
    b'"batches":0,"batch_size":100,"cost_units":0,"checksum":"","snapshot_bytes":0,"created_at":1000.0,'
    b'"prediction":{"duration_s":0.0,"verdict":"no_deadline"},"rejected_file":null,"future_key":[1,2]}'
)


@pytest.mark.parametrize("raw", [PLANNER_MANIFEST, FIRST_MANIFEST, TRIGGERED_MANIFEST])
def test_a_stored_manifest_reads_and_writes_back_byte_for_byte(raw: bytes) -> None:
    manifest = Manifest.decode(raw)
    assert manifest.encode() == raw
    assert Manifest.from_dict(orjson.loads(raw)) == manifest


def test_manifest_fields_read_as_attributes() -> None:
    planned = Manifest.decode(PLANNER_MANIFEST)
    assert (planned.campaign_id, planned.channel, planned.total, planned.accepted, planned.batches) == (
        "old-1",
        "sms",
        3,
        2,
        1,
    )
    assert planned.rejected == {"invalid_phone": 1} and planned.rate == 5 and planned.subject is None
    assert planned.predicted_duration_s == 0.4 and planned.verdict == "no_deadline"
    assert not planned.triggered and planned.kind is None and planned.audience_source is None
    assert planned.rejected_unlisted == 0 and planned.extra == {}

    first = Manifest.decode(FIRST_MANIFEST)
    assert first.audience_digest is None and first.rejected_unlisted is None and first.expires_at is None
    assert first.policy is None and first.schedule is None and first.deadline == 1500.0

    triggered = Manifest.decode(TRIGGERED_MANIFEST)
    assert triggered.triggered and triggered.extra == {"future_key": [1, 2]}


def test_a_manifest_without_a_required_key_is_refused_by_name() -> None:
    data = orjson.loads(PLANNER_MANIFEST)
    del data["batches"], data["channel"]
    with pytest.raises(ManifestError, match=r"campaign 'old-1'.*no channel, batches"):
        Manifest.decode(orjson.dumps(data))
    with pytest.raises(ManifestError, match="not a JSON object"):
        Manifest.decode(b"[1]", campaign_id="x")
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.decode(b"{", campaign_id="x")
    with pytest.raises(ManifestError, match="unknown kind"):
        Manifest.decode(TRIGGERED_MANIFEST.replace(b'"kind":"triggered"', b'"kind":"other"'))


def test_the_planner_writes_the_keys_it_always_wrote_in_the_same_order(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = load_settings(env={"DISPATCH_HOME": str(tmp_path)})
    spec = CampaignSpec(id="codec-plan-1", channel="sms", body="Hi $first_name")
    rows = [{"id": f"r{i}", "phone": f"+44740000000{i}", "first_name": "Ann"} for i in range(3)]
    report = Planner(redis_client, settings).plan(spec, rows)
    raw = redis_client.get(keys.manifest(spec.id))
    assert isinstance(raw, bytes)
    assert list(orjson.loads(raw)) == list(orjson.loads(PLANNER_MANIFEST))  # every key, same order
    manifest = load_manifest(redis_client, spec.id)
    assert manifest.encode() == raw and manifest.accepted == report.accepted == 3
    assert Planner(redis_client, settings).manifest(spec.id) == manifest


def test_extend_retention_keeps_keys_it_does_not_know(redis_client: redis.Redis) -> None:
    raw = TRIGGERED_MANIFEST.replace(b"t:sms-2026010100", b"codec-keep-1")
    raw = raw[:-1] + b',"audience_source":"crm"}'  # as the API appends it
    redis_client.set(keys.manifest("codec-keep-1"), raw, ex=600)
    target = extend_retention(redis_client, "codec-keep-1", 3600)
    stored = redis_client.get(keys.manifest("codec-keep-1"))
    assert isinstance(stored, bytes)
    data = orjson.loads(stored)
    assert data["future_key"] == [1, 2] and data["audience_source"] == "crm" and data["kind"] == "triggered"
    assert data["expires_at"] == target >= time.time() + 3000
    assert {k: v for k, v in data.items() if k != "expires_at"} == orjson.loads(raw)
    assert load_manifest(redis_client, "codec-keep-1").audience_source == "crm"


def test_only_late_or_single_writer_keys_are_omitted_when_unset() -> None:
    bare = Manifest.decode(FIRST_MANIFEST).as_dict()
    assert not OMITTED_WHEN_UNSET & set(bare)
    assert {"subject", "rate", "deadline", "rejected_file"} <= set(bare)


def test_snapshot_rows_have_names_and_one_encoding() -> None:
    row = SnapshotRow("r1", "+447400000001", {"first_name": "Ann"})
    encoded = encode_open_row(row)
    assert encoded == b'["r1","+447400000001",{"first_name":"Ann"}'  # no closing bracket
    assert encode_open_row(("r1", "+447400000001", {"first_name": "Ann"})) == encoded
    assert decode_open_row(encoded) == row and decode_row(encoded + b"]").attrs == {"first_name": "Ann"}
    raw = b'[1000.5,[["r1","+447400000001",{"first_name":"Ann"}],["r2","+447400000002",null]]]'
    batch = decode_batch("c", 0, raw)
    assert batch.not_before == 1000.5
    assert [(r.recipient_id, r.address, r.attrs) for r in batch.rows] == [
        ("r1", "+447400000001", {"first_name": "Ann"}),
        ("r2", "+447400000002", None),
    ]
    assert batch_row(raw, 1) == SnapshotRow("r2", "+447400000002", None)
    assert batch_row(raw, 2) is None


@pytest.mark.parametrize(
    ("raw", "record"),
    [
        (b"sent|1|w-1|SM123|ok|1700000000.125", MessageRecord("sent", 1, "w-1", "SM123", "ok", 1700000000.125)),
        (b"sending|2|w-2|||1700000000.000", MessageRecord("sending", 2, "w-2", "", "", 1700000000.0)),
        (b"dead|3||||", MessageRecord("dead", 3, "", "", "", None)),
    ],
)
def test_a_message_record_reads_and_writes_back_byte_for_byte(raw: bytes, record: MessageRecord) -> None:
    assert MessageRecord.decode(raw) == record
    assert record.encode() == raw


def test_a_group_record_stands_for_its_members() -> None:
    raw = b"sent|1|w-1|msg-9:|ok|1700000000.500|0|9|10"
    group = GroupRecord.decode(raw)
    assert (group.first, group.last, group.members, group.prefix, group.ts) == (0, 9, 10, "msg-9:", 1700000000.5)
    assert group.encode() == raw
    assert group.member("c.0.3") == MessageRecord("sent", 1, "w-1", "msg-9:c.0.3", "ok", 1700000000.5)
    records = {b"3": b"failed|1||SM1|bad|1700000001.000", b"g": raw}
    assert record_value(records, "c", 0, 3) == MessageRecord("failed", 1, "", "SM1", "bad", 1700000001.0)
    resolved = record_value(records, "c", 0, 4)
    assert resolved is not None and resolved.provider_id == "msg-9:c.0.4"
    assert record_value(records, "c", 0, 10) is None
    assert record_value({}, "c", 0, 0) is None
