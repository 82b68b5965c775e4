"""Delivery receipts: the provider callback endpoints, applied to the message records.

``channels.receipts`` verifies and parses each provider's callbacks (forged, altered, stale or
replayed ones are refused before anything changes); this module applies the receipts to the
records through ``Tracker.apply_receipt``, which tolerates duplicates and any order: a receipt
for a message whose send is not yet confirmed is kept and applied at confirmation. A receipt
changes only a message of its provider's channel (a Twilio callback never touches an email).

A provider's route is mounted only with a real secret to verify it by (``ReceiptSecrets``): the
Twilio route with an SMS auth token other than the public demo default, the SendGrid route with
``sendgrid_public_key``, our webhook route with ``receipt_webhook_secret``. The demo token is in
the source for everyone to read, so a route verifying by it would accept anyone's receipts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aredis
from aiohttp import web

from channels.receipts import OnEngagement, OnReceipts, Receipt, RedisReplayGuard, ReplayGuard, receipt_routes
from dispatch.config import DEMO_SMS_AUTH_TOKEN, Settings
from dispatch.engage.service import build_engagement
from dispatch.send.tracking import Tracker, parse_ref
from monitoring.metrics import Metrics

__all__ = ["DEMO_SMS_AUTH_TOKEN", "ReceiptApplier", "ReceiptSecrets", "build_receipt_app", "configured_receipt_routes"]

log = logging.getLogger(__name__)

#: Receipt statuses that end a message's life at the provider (others, like "sent", are progress).
FINAL_STATUSES = frozenset({"delivered", "failed", "bounced"})


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptSecrets:
    """What verifies each provider's receipts; ``None`` leaves that provider's route out."""

    twilio_auth_token: str | None = None
    sendgrid_public_key: str | None = None
    webhook_secret: str | None = None
    #: The secret of the Aliyun SMS reply push URL (``?token=``): mounts its route.
    aliyun_reply_secret: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ReceiptSecrets:
        token = settings.sms_auth_token.reveal()
        webhook = settings.receipt_webhook_secret
        aliyun = settings.aliyun_reply_secret
        return cls(
            twilio_auth_token=token if token and token != DEMO_SMS_AUTH_TOKEN else None,
            sendgrid_public_key=settings.sendgrid_public_key or None,
            webhook_secret=(webhook.reveal() or None) if webhook is not None else None,
            aliyun_reply_secret=(aliyun.reveal() or None) if aliyun is not None else None,
        )

    @property
    def providers(self) -> list[str]:
        """The providers whose routes these secrets mount."""
        configured = {
            "twilio": self.twilio_auth_token,
            "sendgrid": self.sendgrid_public_key,
            "webhook": self.webhook_secret,
            "aliyun": self.aliyun_reply_secret,
        }
        return [name for name, secret in configured.items() if secret]


class ReceiptApplier:
    """Turns parsed receipts into record updates; counts what it applied."""

    def __init__(self, tracker: Tracker, metrics: Metrics | None = None) -> None:
        self._tracker = tracker
        self._metrics = metrics
        self.applied = self.deferred = self.ignored = self.unknown = self.mismatched = 0

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
            result = await self._tracker.apply_receipt(
                receipt.ref, receipt.status, receipt.code, channel=receipt.channel
            )
            if result == 1:
                self.applied += 1
            elif result == 2:
                self.deferred += 1
            elif result == 0:
                self.ignored += 1
            elif result == -2:
                self.mismatched += 1
                log.warning("receipt from %s names a message of another channel: ignored", receipt.provider)
            else:
                self.unknown += 1


def configured_receipt_routes(
    settings: Settings,
    on_receipts: OnReceipts,
    *,
    replay_guard: ReplayGuard,
    public_base_url: str,
    secrets: ReceiptSecrets | None = None,
    on_engagement: OnEngagement | None = None,
) -> list[web.RouteDef]:
    """The receipt routes of every provider with a real secret (``ReceiptSecrets.from_settings``
    unless ``secrets`` is given); logs which are mounted. With ``on_engagement``, SendGrid's
    engagement events and the inbound-reply routes (Twilio, Aliyun) go to it."""
    chosen = secrets or ReceiptSecrets.from_settings(settings)
    if chosen.providers:
        log.info("delivery-receipt routes mounted: %s", ", ".join(chosen.providers))
    else:
        log.info(
            "no delivery-receipt route mounted: set DISPATCH_SMS_AUTH_TOKEN (not the demo default), "
            "DISPATCH_SENDGRID_PUBLIC_KEY or DISPATCH_RECEIPT_WEBHOOK_SECRET"
        )
    return receipt_routes(
        on_receipts,
        twilio_auth_token=chosen.twilio_auth_token,
        sendgrid_public_key=chosen.sendgrid_public_key,
        webhook_secret=chosen.webhook_secret,
        replay_guard=replay_guard,
        public_base_url=public_base_url,
        on_engagement=on_engagement,
        aliyun_reply_secret=chosen.aliyun_reply_secret,
    )


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
    """An aiohttp application serving ``/callbacks/{twilio,sendgrid,webhook}`` (each only with a
    real secret; the keyword arguments add to the settings' secrets), the engagement routes
    (inbound replies, ``/r/{token}`` when a link base URL is set) and their ledger writes."""
    applier = ReceiptApplier(Tracker(client, ttl_s=settings.retention_s), metrics)
    engagement = build_engagement(settings, client)
    secrets = ReceiptSecrets.from_settings(settings)
    secrets = dataclasses.replace(
        secrets,
        sendgrid_public_key=sendgrid_public_key or secrets.sendgrid_public_key,
        webhook_secret=webhook_secret or secrets.webhook_secret,
    )
    app = web.Application(client_max_size=1024 * 1024)
    app.add_routes(
        configured_receipt_routes(
            settings,
            applier,
            replay_guard=replay_guard or RedisReplayGuard(client),
            public_base_url=public_base_url,
            secrets=secrets,
            on_engagement=engagement.applier,
        )
    )
    engagement.mount(app, client)
    return app, applier
