"""The channels and providers the product ships, registered in one place.

:func:`default_registry` builds a new :class:`channels.registry.Registry` on each call (no
import-time registration, no shared mutable instance). Everything that lists channels (campaign
validation, the API's enums and OpenAPI document, the audience reader's consent columns, the
address validator, the planner, the prediction, the command line, the worker's adapters) derives
its list from it.

``wechat`` is registered as a channel without a provider: its openids can be validated, its
consent column read and its addresses suppressed ahead of time, but no campaign can use it until
a WeChat provider is registered (``Registry.channel_names(sendable=True)`` leaves it out).

Adding a provider: write its adapter module (a :class:`channels.base.Channel` subclass, a
``from_settings`` factory and a ``PROVIDER = ProviderSpec(...)``), then add one
``registry.add_provider(module.PROVIDER)`` line below (after its channel's line; the first
provider registered for a channel is that channel's default).
"""

from __future__ import annotations

from typing import Final

from channels import aliyun_sms, email, push, sms, webhook
from channels.registry import BodyLimits, ChannelSpec, Registry
from channels.segments import segments

__all__ = ["EMAIL", "PUSH", "SMS", "WEBHOOK", "WECHAT", "default_registry"]

#: Text messages to a phone number; the cost is the segment count (what rates and prices count).
#: Twilio refuses bodies over 1,600 characters (error 21617).
SMS: Final = ChannelSpec(
    name="sms", address_field="phone", address_kind="sms_number", limits=BodyLimits(max_chars=1600), cost=segments
)
#: Email; SendGrid needs a subject (or a template that has one).
EMAIL: Final = ChannelSpec(
    name="email", address_field="email", address_kind="email", limits=BodyLimits(subject_required=True)
)
#: Push notifications to a device token; FCM refuses payloads over 4,096 bytes.
PUSH: Final = ChannelSpec(
    name="push", address_field="push_token", address_kind="push_token", limits=BodyLimits(max_bytes=4096)
)
#: Signed JSON posted to a per-recipient URL.
WEBHOOK: Final = ChannelSpec(name="webhook", address_field="webhook_url", address_kind="url")
#: WeChat template messages to an openid: no provider yet.
WECHAT: Final = ChannelSpec(name="wechat", address_field="openid", address_kind="openid")


def default_registry() -> Registry:
    """The standard channels and providers, in the order lists show them."""
    registry = Registry()
    for channel in (SMS, EMAIL, PUSH, WEBHOOK, WECHAT):
        registry.add_channel(channel)
    registry.add_provider(sms.PROVIDER)
    registry.add_provider(aliyun_sms.PROVIDER)  # a second SMS provider (DISPATCH_SMS_PROVIDERS)
    registry.add_provider(email.PROVIDER)
    registry.add_provider(push.PROVIDER)
    registry.add_provider(webhook.PROVIDER)
    return registry
