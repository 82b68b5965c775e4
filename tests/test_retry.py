"""The retry policy: its strategies asked directly (a built retry state), and the send step, broker
and worker using them."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from dramatiq.middleware import Retries
from tenacity import RetryCallState, Retrying

from channels.base import Channel, Message, Result, Retryable, Sent
from dispatch.config import load_settings
from dispatch.send.broker import build_broker
from dispatch.send.engine import Item, SendContext, SendStep
from dispatch.send.retry import RetryPolicy
from dispatch.send.worker import OUTAGE_ERRORS, _through_outages
from ratelimit import BackendUnavailable


@dataclass
class _Pending:
    attempts: int


@dataclass
class _Round:
    pending: list[_Pending] = field(default_factory=list)
    retry_after: float = 0.0


def _state(attempt: int, last: _Round) -> RetryCallState:
    """The retry state tenacity hands a strategy after ``attempt`` rounds, the last one ``last``."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_result(last)
    return state


def _round(*attempts: int, retry_after: float = 0.0) -> _Round:
    return _Round([_Pending(a) for a in attempts], retry_after)


def test_defaults_are_the_numbers_the_send_path_ran_with(tmp_path: Path) -> None:
    policy = RetryPolicy.from_settings(load_settings({"DISPATCH_HOME": str(tmp_path)}))
    assert policy.max_attempts == 5
    assert policy.long_wait_s == 5.0
    assert (policy.backoff_multiplier_s, policy.backoff_max_s) == (0.05, 2.0)
    retries = policy.broker_retries()
    assert (retries.max_retries, retries.min_backoff, retries.max_backoff) == (20, 500, 30_000)
    assert (policy.outage_budget_s, policy.outage_first_wait_s, policy.outage_max_wait_s) == (600.0, 0.2, 5.0)


def test_max_attempts_comes_from_settings(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path), "DISPATCH_MAX_ATTEMPTS": "7"})
    assert RetryPolicy.from_settings(settings).max_attempts == 7


def test_invalid_numbers_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="long_wait_s"):
        RetryPolicy(long_wait_s=-1.0)


def test_send_stop_once_a_pending_message_used_its_attempts() -> None:
    stop = RetryPolicy(max_attempts=3).send_stop()
    assert not stop(_state(1, _round(1, 2)))
    assert stop(_state(1, _round(1, 3)))  # one message is out of attempts (one a former run made)
    assert stop(_state(2, _round(4)))
    assert not stop(_state(9, _round()))  # nothing pending: the retry predicate ends it, not stop


def test_send_stop_hands_a_long_wait_to_the_broker() -> None:
    stop = RetryPolicy(long_wait_s=5.0).send_stop()
    assert not stop(_state(1, _round(1, retry_after=5.0)))
    assert stop(_state(1, _round(1, retry_after=5.01)))


def test_gives_up_agrees_with_the_stop_strategy() -> None:
    policy = RetryPolicy(max_attempts=3, long_wait_s=5.0)
    stop = policy.send_stop()
    for last in (
        _round(1),
        _round(3),
        _round(1, 2),
        _round(2, 3),
        _round(1, retry_after=6.0),
        _round(1, retry_after=5),
    ):
        assert policy.gives_up(last) == stop(_state(1, last)), last
    assert policy.gives_up(_round())


def test_send_wait_is_jittered_exponential_and_honours_retry_after() -> None:
    policy = RetryPolicy(backoff_multiplier_s=0.05, backoff_max_s=2.0)
    wait = policy.send_wait()
    for attempt, window in ((1, 0.05), (2, 0.1), (3, 0.2), (6, 1.6), (7, 2.0), (40, 2.0)):
        waits = [wait(_state(attempt, _round(1))) for _ in range(200)]
        assert all(0.0 <= w <= window for w in waits), (attempt, max(waits))
        assert max(waits) > window / 4  # jitter spreads over the window, not one fixed point
    assert all(wait(_state(1, _round(1, retry_after=3.0))) == 3.0 for _ in range(50))
    assert all(0.0 <= policy.first_retry_wait(0.0) <= 0.1 for _ in range(200))
    assert policy.first_retry_wait(1.5) == 1.5


def test_outage_wait_doubles_from_a_fifth_of_a_second_up_to_five() -> None:
    wait = RetryPolicy().outage_wait()
    assert [wait(_state(n, _round())) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]


def test_worker_waits_out_a_redis_outage_and_gives_up_after_the_budget() -> None:
    slept: list[float] = []
    failures = [redis.ConnectionError("down"), BackendUnavailable("down"), redis.TimeoutError("slow")]

    def flaky() -> str:
        if failures:
            raise failures.pop(0)
        return "done"

    policy = RetryPolicy()
    assert policy.reconnecting(OUTAGE_ERRORS, "test", sleep=slept.append)(flaky) == "done"
    assert slept == [0.2, 0.4, 0.8]

    def down() -> str:
        raise redis.ConnectionError("still down")

    with pytest.raises(redis.ConnectionError, match="still down"):  # the original error, not tenacity's
        _through_outages(RetryPolicy(outage_budget_s=0.0), down, "test")

    calls = 0

    def wrong() -> str:
        nonlocal calls
        calls += 1
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # not an outage: raised at once, dramatiq's Retries take it
        policy.reconnecting(OUTAGE_ERRORS, "test", sleep=slept.append)(wrong)
    assert calls == 1


def test_broker_retries_come_from_the_policy(redis_url: str, tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path)})
    broker = build_broker(settings, redis_url)
    try:
        (retries,) = [m for m in broker.middleware if isinstance(m, Retries)]
        expected = RetryPolicy.from_settings(settings).broker_retries()
        assert (retries.max_retries, retries.min_backoff, retries.max_backoff) == (
            expected.max_retries,
            expected.min_backoff,
            expected.max_backoff,
        )
    finally:
        broker.close()


class _Scripted(Channel):
    """Answers each call from a script: per round, the results by message position."""

    name = "sms"
    provider = "test"

    def __init__(self, rounds: list[list[str]], retry_after: float | None = None) -> None:
        self.rounds = rounds
        self.retry_after = retry_after
        self.calls: list[int] = []

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        script = self.rounds[min(len(self.calls), len(self.rounds) - 1)]
        self.calls.append(len(messages))
        return [
            Sent(m.ref, f"id-{m.ref}") if what == "ok" else Retryable(m.ref, "busy", 503, self.retry_after)
            for m, what in zip(messages, script, strict=False)
        ]


def _items(n: int, attempts: int = 0) -> list[Item]:
    items = []
    for i in range(n):
        item = Item(i, f"r{i}", f"+4474000{i:05d}", None, attempts)
        item.message = Message(ref=f"ref{i}", address=item.address, body="hi", idempotency_key=f"k{i}")
        items.append(item)
    return items


async def _run(channel: _Scripted, items: list[Item], policy: RetryPolicy) -> tuple[SendContext, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def end(ctx: SendContext, items: list[Item]) -> None:
        return None

    ctx = SendContext("c", 0, channel, {}, string.Template("hi"))
    await SendStep(policy, sleep=sleep)(ctx, items, end)
    return ctx, slept


async def test_send_step_retries_only_the_failed_messages_within_the_policy() -> None:
    channel = _Scripted([["ok", "retry", "retry"], ["ok", "retry"], ["ok"]])
    items = _items(3)
    ctx, slept = await _run(channel, items, RetryPolicy(max_attempts=5))
    assert channel.calls == [3, 2, 1]
    assert [(i.outcome.state, i.attempts) for i in items if i.outcome] == [("sent", 1), ("sent", 2), ("sent", 3)]
    assert len(slept) == 2 and all(0.0 <= s <= 0.1 for s in slept)
    assert ctx.retries == 3 and ctx.long_wait == 0.0


async def test_send_step_dead_letters_after_max_attempts_counting_earlier_runs() -> None:
    channel = _Scripted([["retry", "retry"]])
    items = _items(2, attempts=1)  # one attempt made by an earlier broker run
    await _run(channel, items, RetryPolicy(max_attempts=3))
    assert channel.calls == [2, 2]
    assert [(i.outcome.state, i.attempts, i.outcome.code) for i in items if i.outcome] == [("dead", 3, "http_503")] * 2


async def test_send_step_hands_a_long_retry_after_to_the_broker_without_sleeping() -> None:
    channel = _Scripted([["retry"]], retry_after=30.0)
    items = _items(1)
    ctx, slept = await _run(channel, items, RetryPolicy(long_wait_s=5.0))
    assert channel.calls == [1] and slept == []
    assert items[0].outcome is not None and items[0].outcome.state == "retry"
    assert ctx.long_wait == 30.0
