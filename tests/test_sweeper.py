"""Self-healing: a running campaign nobody works on is set going again; counters follow records."""

from __future__ import annotations

import redis

from dispatch.plan.manifest import Manifest
from dispatch.send.sweeper import Sweeper, recount
from dispatch.send.tracking import MessageRecord, campaign_counters
from dispatch.store import keys


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _campaign(client: redis.Redis, cid: str, batches: int) -> None:
    manifest = Manifest(
        campaign_id=cid,
        fingerprint="test",
        channel="sms",
        body="hi",
        total=10 * batches,
        accepted=10 * batches,
        rejected={},
        batches=batches,
        batch_size=10,
        cost_units=10 * batches,
        checksum="",
        snapshot_bytes=0,
        created_at=0.0,
        prediction={"duration_s": 0.0, "verdict": "no_deadline"},
    )
    client.set(keys.manifest(cid), manifest.encode())
    client.zadd(keys.CAMPAIGNS, {cid: 1.0})
    client.hset(keys.control(cid), "state", "running")


def test_stalled_campaign_gets_its_unfinished_unleased_batches_back(redis_client: redis.Redis) -> None:
    cid = "sweep-1"
    _campaign(redis_client, cid, 5)
    redis_client.sadd(keys.done_batches(cid), 0)  # done
    redis_client.hset(keys.records(cid, 1), "L", "alive-worker|1.0")  # being sent (its heartbeat says)
    redis_client.set(keys.worker_alive("alive-worker"), b"1")
    redis_client.sadd(keys.worker_runs("alive-worker"), keys.run_member(cid, 1))
    redis_client.hset(keys.records(cid, 2), "W", "99999999999")  # waiting for quiet hours to end
    # batch 3: not done, no lease, not waiting: its broker message was lost
    # batch 4: leased by a live worker that is not sending it (a restart lost the lease's release)
    redis_client.hset(keys.records(cid, 4), "L", "alive-worker|1.0")
    enqueued: list[tuple[str, int]] = []
    actions: list[tuple[str, int]] = []
    clock = _Clock()
    sweeper = Sweeper(
        redis_client,
        lambda c, b: enqueued.append((c, b)),
        owner="w1",
        stall_s=10,
        cooldown_s=30,
        clock=clock,
        on_action=lambda a, n: actions.append((a, n)),
    )
    assert sweeper.sweep() == []  # first look: nothing known yet
    clock.now += 5
    assert sweeper.sweep() == []  # not stalled long enough
    clock.now += 6
    assert sweeper.sweep() == [(cid, [3, 4])]
    assert enqueued == [(cid, 3), (cid, 4)] and actions == [("requeued", 2)]
    clock.now += 5
    assert sweeper.sweep() == []  # cooling down
    # a second worker is not elected while the first one sweeps
    other = Sweeper(redis_client, lambda c, b: enqueued.append((c, b)), owner="w2", clock=clock)
    assert not other.elected()
    # progress resets the stall
    redis_client.hset(keys.counters(cid), "sent", 3)
    clock.now += 60
    assert sweeper.sweep() == []


def test_paused_campaigns_are_left_alone(redis_client: redis.Redis) -> None:
    cid = "sweep-paused"
    _campaign(redis_client, cid, 2)
    redis_client.hset(keys.control(cid), "state", "paused")
    enqueued: list[tuple[str, int]] = []
    clock = _Clock()
    sweeper = Sweeper(redis_client, lambda c, b: enqueued.append((c, b)), owner="w-p", clock=clock)
    redis_client.delete(keys.SWEEPER)
    for _ in range(5):
        sweeper.sweep()
        clock.now += 20
    assert enqueued == []


def test_recount_takes_the_records_word(redis_client: redis.Redis) -> None:
    cid = "recount-1"
    _campaign(redis_client, cid, 1)
    records = {
        b"0": MessageRecord("sent", 1, "", "SM1", "", 1.0).encode(),
        b"1": MessageRecord("delivered", 1, "", "SM2", "", 1.0).encode(),
        b"2": MessageRecord("failed", 1, "", "SM3", "30003", 1.0).encode(),  # undelivered receipt
        b"3": MessageRecord("failed", 5, "", "", "http_500", 1.0).encode(),  # refused: dead letter
        b"4": MessageRecord("failed", 1, "", "", "in_doubt", 1.0).encode(),  # held in doubt: dead letter
        b"5": MessageRecord("suppressed", 0, "", "", "suppressed", 1.0).encode(),
    }
    redis_client.hset(keys.records(cid, 0), mapping=records)  # type: ignore[arg-type]
    redis_client.sadd(keys.dead_letters(cid), "0:3", "0:4")
    redis_client.hset(keys.counters(cid), mapping={"sent": 1, "retries": 7})  # a restart lost the rest
    changed = recount(redis_client, cid, 1)
    counters = campaign_counters(redis_client, cid)
    assert counters["sent"] == 3 and counters["delivered"] == 1 and counters["undelivered"] == 1
    assert counters["failed"] == 2 and counters["dead_letters"] == 2 and counters["in_doubt"] == 1
    assert counters["suppressed"] == 1 and counters["retries"] == 7  # retries are not in records: kept
    assert "sent" in changed and "retries" not in changed
    assert recount(redis_client, cid, 1) == {}  # agreeing counters are left alone
