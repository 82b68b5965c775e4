"""Delivery receipts: the provider callback endpoints, applied to the message records.

``channels.receipts`` verifies and parses each provider's callbacks (forged, altered, stale or
replayed ones are refused before anything changes); this module applies the receipts to the
records through ``Tracker.apply_receipt``, which tolerates duplicates and any order: a receipt
for a message whose send is not yet confirmed is kept and applied at confirmation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis.asyncio as aredis
from aiohttp import web

from channels.receipts import Receipt, RedisReplayGuard, ReplayGuard, receipt_routes
from dispatch.config import Secret, Settings
from dispatch.send.tracking import Tracker, parse_ref
from monitoring.metrics import Metrics

__all__ = ["ReceiptApplier", "build_receipt_app"]

log = logging.getLogger(__name__)

#: Receipt statuses that end a message's life at the provider (others, like "sent", are progress).
FINAL_STATUSES = frozenset({"delivered", "failed", "bounced"})


class ReceiptApplier:
    """Turns parsed receipts into record updates; counts what it applied."""

    def __init__(self, tracker: Tracker, metrics: Metrics | None = None) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self.applied = self.deferred = self.ignored = self.unknown = 0

    async def __call__(self, receipts: Sequence[Receipt]) -> None:
        for receipt in receipts:
            if self._metrics is not None:
                self._metrics.record_callback(receipt.provider)
            if receipt.status not in FINAL_STATUSES:
                self.ignored += 1
                continue
            try:
                parse_ref(receipt.ref)
            except ValueError:
                self.unknown += 1
                log.info("receipt for an unknown reference from %s ignored", receipt.provider)
                continue
            result = await self._tracker.apply_receipt(receipt.ref, receipt.status, receipt.code)
            if result == 1:
                self.applied += 1
            elif result == 2:
                self.deferred += 1
            elif result == 0:
                self.ignored += 1
            else:
                self.unknown += 1


def _revealed(secret: Secret | None) -> str | None:
    return secret.reveal() if secret is not None else None


def build_receipt_app(
    settings: Settings,
    client: aredis.Redis,
    *,
    public_base_url: str,
    sendgrid_public_key: str | None = None,
    webhook_secret: str | None = None,
    replay_guard: ReplayGuard | None = None,
    metrics: Metrics | None = None,
) -> tuple[web.Application, ReceiptApplier]:
    """An aiohttp application serving ``/callbacks/{twilio,sendgrid,webhook}``."""
    applier = ReceiptApplier(Tracker(client, ttl_s=settings.retention_s), metrics)
    app = web.Application(client_max_size=1024 * 1024)
    app.add_routes(
        receipt_routes(
            applier,
            twilio_auth_token=settings.sms_auth_token.reveal(),
            sendgrid_public_key=sendgrid_public_key or settings.sendgrid_public_key,
            webhook_secret=webhook_secret or _revealed(settings.receipt_webhook_secret),
            replay_guard=replay_guard or RedisReplayGuard(client),
            public_base_url=public_base_url,
        )
    )
    return app, applier
