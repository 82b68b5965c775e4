"""The engagement pieces of one receiving process (``dispatch serve``, ``dispatch callbacks``),
built once from settings: the ledger, the applier of verified events, the link redirect."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aredis
from aiohttp import web

from dispatch.config import Settings
from dispatch.engage.apply import EngagementApplier
from dispatch.engage.ledger import EngagementLedger
from dispatch.engage.links import LinkSigner, mount_links
from dispatch.engage.replies import ReplyIndex
from dispatch.rules.suppression import AddressHasher, AsyncSuppressionStore, hasher_for

__all__ = ["Engagement", "build_engagement"]


@dataclass(frozen=True, slots=True)
class Engagement:
    ledger: EngagementLedger
    applier: EngagementApplier
    #: None when no public base URL for links is configured (no redirect route then).
    signer: LinkSigner | None

    def mount(self, app: web.Application, client: aredis.Redis) -> None:
        """The redirect route (``/r/{token}``) on ``app`` when links are configured."""
        if self.signer is not None:
            mount_links(app, self.signer, self.ledger, client)


def build_engagement(settings: Settings, client: aredis.Redis, *, hasher: AddressHasher | None = None) -> Engagement:
    hashed = hasher or hasher_for(settings)
    ledger = EngagementLedger(client, ttl_s=settings.retention_s)
    applier = EngagementApplier(
        ledger,
        AsyncSuppressionStore(client, hasher=hashed),
        ReplyIndex(client, hasher=hashed, ttl_s=settings.reply_window_s),
    )
    return Engagement(ledger, applier, LinkSigner.from_settings(settings))
