"""Verified engagement (``channels.receipts``) into the ledger and the suppression list.

An opt-out or a spam report suppresses the address at once, before anything else is written
(the recipient's next message, in this campaign or any other, is refused at its send-time
re-check): an unsubscribe or spam report on ``email``, an opt-out reply on ``sms``. Then the
event is recorded on its message: SendGrid's events name theirs; a reply is credited to the last
message sent to its number (``dispatch.engage.replies.ReplyIndex``), ``optout`` for a keyword
and ``reply`` otherwise. Counters say what happened to each event (they add up to the events
received); addresses are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from channels.receipts import EngagementEvent, InboundReply
from dispatch.engage.ledger import EngagementLedger
from dispatch.engage.replies import ReplyIndex, is_optout
from dispatch.rules.suppression import AsyncSuppressionStore
from dispatch.rules.validation import AddressValidator

__all__ = ["ALIYUN_REGION", "EngagementApplier"]

log = logging.getLogger(__name__)

#: Aliyun pushes mainland numbers without their country code.
ALIYUN_REGION = "CN"


class EngagementApplier:
    """``OnEngagement`` of the receipt routes."""

    def __init__(
        self,
        ledger: EngagementLedger,
        suppression: AsyncSuppressionStore,
        replies: ReplyIndex,
        *,
        validator: AddressValidator | None = None,
    ) -> None:
        self._ledger = ledger
        self._suppression = suppression
        self._replies = replies
        self._validator = validator or AddressValidator()
        #: Events recorded for the first time / already recorded / naming no known campaign.
        self.recorded = self.duplicates = self.unknown = 0
        #: Replies whose number got no message within the window (an opt-out is still applied).
        self.unmatched = 0
        #: Opt-outs and spam reports added to the suppression list; addresses that did not validate.
        self.suppressed = self.invalid = 0

    async def __call__(self, events: Sequence[EngagementEvent], replies: Sequence[InboundReply]) -> None:
        for event in events:
            if event.event in ("optout", "spamreport") and event.address is not None:
                await self._suppress(event.channel, event.address, None)
            await self._record(event.ref, event.event, event.occurred_at)
        for reply in replies:
            region = ALIYUN_REGION if reply.provider == "aliyun" else None
            reason, phone = self._validator.check_phone(reply.phone, sms=False, region=region)
            if reason is not None:
                self.invalid += 1
                log.info("reply from %s with an unreadable number ignored", reply.provider)
                continue
            optout = is_optout(reply.body)
            if optout:
                await self._suppression.add("sms", [phone])
                self.suppressed += 1
            ref = await self._replies.last_ref(phone)
            if ref is None:
                self.unmatched += 1
                continue
            await self._record(ref, "optout" if optout else "reply", reply.occurred_at)

    async def _suppress(self, channel: str, address: str, region: str | None) -> None:
        reason, normalized = self._validator.check(channel, address, region)
        if reason is not None:
            self.invalid += 1
            log.info("opt-out on %s with an unreadable address: not suppressed", channel)
            return
        await self._suppression.add(channel, [normalized])
        self.suppressed += 1

    async def _record(self, ref: str, event: str, at: float) -> None:
        try:
            outcome = (await self._ledger.record(ref, event, at=at)).outcome
        except ValueError:  # not a ref of ours
            self.unknown += 1
            return
        if outcome == "first":
            self.recorded += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        else:
            self.unknown += 1
