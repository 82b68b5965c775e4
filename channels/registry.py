"""The registry of channels and providers: the one home of what a channel is.

A *channel* is a way to reach a recipient (``sms``, ``email``, ``push``, ``webhook``, ``wechat``):
its :class:`ChannelSpec` says which audience field holds the address, how that address is
validated, which column holds the recipient's consent, what the message body may hold and what
one message costs the rate limiter. A *provider* is a company's API that delivers a channel's
messages (Twilio for SMS, SendGrid for email, ...): its :class:`ProviderSpec` names the adapter
class (:class:`channels.base.Channel`), its settings section, what it can do and how to build it.
A channel may have several providers; the first one registered for it is its default.

Everything is registered explicitly; nothing is discovered by scanning modules::

    registry = Registry()
    registry.add_channel(ChannelSpec(name="sms", address_field="phone", address_kind="sms_number"))
    registry.add_provider(channels.sms.PROVIDER)       # Twilio; refused if "sms" is unknown
    registry.channel_names()                           # ("sms",)
    adapter = registry.provider_for("sms").build(session, provider_settings)

:func:`channels.standard.default_registry` builds the registry the product uses. A second
registration of a channel or provider name is refused (:class:`DuplicateChannel`,
:class:`DuplicateProvider`), as is a provider for a channel not registered (:class:`UnknownChannel`).

:class:`ChannelRegistry` is the older bare table of adapter factories by name (kept for callers
that build adapters by hand); :class:`Registry` is the registry of channels and providers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import aiohttp

from channels.base import Channel
from channels.errors import ChannelConfigError, DuplicateChannel, DuplicateProvider, UnknownChannel
from channels.tokens import TokenProvider

__all__ = [
    "AddressKind",
    "BodyLimits",
    "ChannelFactory",
    "ChannelRegistry",
    "ChannelSpec",
    "ProviderFactory",
    "ProviderSettings",
    "ProviderSpec",
    "ReceiptKind",
    "Registry",
    "Revealable",
    "one_unit",
]

#: How a channel's addresses are validated and normalized (``dispatch.rules.validation``):
#: ``sms_number``: a phone number in E.164 that can receive SMS; ``email``: an email address;
#: ``push_token``: an FCM or APNs device token; ``url``: an http(s) URL; ``openid``: a WeChat openid.
AddressKind = Literal["sms_number", "email", "push_token", "url", "openid"]

#: How a provider reports delivery: ``status_callback``: a signed form POST per message to a URL
#: sent with it (Twilio); ``event_webhook``: signed batches of events (SendGrid); ``signed_webhook``:
#: our own signed JSON receipts; ``none``: the provider sends no delivery receipts (FCM).
ReceiptKind = Literal["status_callback", "event_webhook", "signed_webhook", "none"]


def one_unit(body: str) -> int:
    """The cost of a message whose provider counts messages, not their size: 1."""
    return 1


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyLimits:
    """What a channel's message may hold. Declared here; enforcing them is the planner's job."""

    #: Longest body in characters (None: no limit of its own).
    max_chars: int | None = None
    #: Largest payload in bytes (None: no limit of its own).
    max_bytes: int | None = None
    #: Whether every message needs a subject (or a provider template that supplies one).
    subject_required: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelSpec:
    """One channel: where its addresses are, how they are checked, what a message may be."""

    name: str
    #: The recipient field and, by default, the audience column that holds the address.
    address_field: str
    address_kind: AddressKind
    #: The audience column holding the recipient's consent (default ``consent_<name>``).
    consent_column: str = ""
    limits: BodyLimits = field(default_factory=BodyLimits)
    #: Rate-limit units one rendered body costs (SMS: segments, what prices and limits count).
    cost: Callable[[str], int] = one_unit

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower():
            raise ChannelConfigError(f"channel name {self.name!r}: use lowercase letters, digits and '_'")
        if not self.consent_column:
            object.__setattr__(self, "consent_column", f"consent_{self.name}")

    @property
    def cost_per_body(self) -> bool:
        """Whether the cost depends on the body (a personalized body is then costed per recipient)."""
        return self.cost is not one_unit


@runtime_checkable
class Revealable(Protocol):
    """A secret setting (``dispatch.credentials.Secret``): its text only on request."""

    def reveal(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSettings:
    """One provider's settings section, as the configuration holds it.

    ``values`` are the settings named ``<section>_<key>`` with the prefix taken off (secrets stay
    wrapped until an adapter asks for them). ``callback_url`` is where the provider should post
    delivery receipts (None: receipts are not wanted or there is no public URL). The typed
    readers raise :class:`ChannelConfigError` naming the full setting.
    """

    section: str
    values: Mapping[str, object]
    callback_url: str | None = None
    #: Refreshed credentials for providers whose tokens expire (``channels.tokens``); None: the
    #: section's static ones.
    tokens: TokenProvider | None = None

    def _raw(self, key: str) -> object:
        try:
            return self.values[key]
        except KeyError:
            raise ChannelConfigError(f"setting {self.section}_{key} is missing") from None

    def text(self, key: str) -> str:
        value = self._raw(key)
        if isinstance(value, Revealable):
            value = value.reveal()
        if not isinstance(value, str):
            raise ChannelConfigError(f"setting {self.section}_{key} must be text")
        return value

    def flag(self, key: str) -> bool:
        value = self._raw(key)
        if not isinstance(value, bool):
            raise ChannelConfigError(f"setting {self.section}_{key} must be true or false")
        return value


#: Builds a provider's adapter from the process's HTTP session and the provider's settings.
ProviderFactory = Callable[[aiohttp.ClientSession, ProviderSettings], Channel]


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderSpec:
    """One provider: its adapter class (which names the channel and states the batch sizes), its
    settings section, what it can do, and the factory that builds the adapter."""

    adapter: type[Channel]
    #: Settings of this provider are named ``<settings_section>_<key>`` (``sms_base_url``).
    settings_section: str
    factory: ProviderFactory
    #: Whether the provider itself deduplicates on our idempotency key (no real one does: Twilio,
    #: SendGrid and FCM ignore it). ``idempotency_configurable``: an endpoint in front of it (a
    #: proxy, the mock) may, and the ``<section>_honours_idempotency`` setting says so.
    honours_idempotency_keys: bool = False
    idempotency_configurable: bool = False
    receipts: ReceiptKind = "none"
    #: Path (under the public callback base URL) the provider posts receipts to, if any.
    callback_path: str | None = None
    #: Whether the provider has an API to look up what was sent (reconciliation after a crash:
    #: Twilio's Messages list, SendGrid's Email Activity API). It says the adapter implements
    #: ``Channel.lookup``; an adapter instance's ``can_lookup`` says whether its configuration
    #: allows it (SendGrid's is a paid add-on).
    lookup_api: bool = False

    def __post_init__(self) -> None:
        implements = self.adapter.lookup is not Channel.lookup
        if self.lookup_api != implements:
            raise ChannelConfigError(
                f"provider {self.adapter.provider}: lookup_api={self.lookup_api} but its adapter "
                f"{'implements' if implements else 'does not implement'} Channel.lookup"
            )

    @property
    def name(self) -> str:
        """The provider's name (the metrics' ``provider`` label): ``twilio``, ``sendgrid``, ..."""
        return self.adapter.provider

    @property
    def channel(self) -> str:
        """The channel the provider serves."""
        return self.adapter.name

    @property
    def max_batch(self) -> int:
        """Most messages one ``send`` call gets."""
        return self.adapter.max_batch

    @property
    def messages_per_request(self) -> int:
        """Messages one provider request carries (1: a per-message API)."""
        return self.adapter.messages_per_request

    def build(self, session: aiohttp.ClientSession, settings: ProviderSettings) -> Channel:
        return self.factory(session, settings)


class Registry:
    """The channels and their providers, by name, in registration order.

    A duplicate name is refused; a provider must serve a registered channel. A channel may have
    no provider yet (it can be validated, consented to and suppressed, not sent to).
    """

    def __init__(self) -> None:
        self._channels: dict[str, ChannelSpec] = {}
        self._providers: dict[str, ProviderSpec] = {}

    def add_channel(self, spec: ChannelSpec) -> None:
        if spec.name in self._channels:
            raise DuplicateChannel(f"a channel named {spec.name!r} is already registered")
        self._channels[spec.name] = spec

    def add_provider(self, spec: ProviderSpec) -> None:
        if spec.name in self._providers:
            raise DuplicateProvider(f"a provider named {spec.name!r} is already registered")
        if spec.channel not in self._channels:
            raise UnknownChannel(
                f"provider {spec.name!r} serves channel {spec.channel!r}, which is not registered "
                f"(registered: {', '.join(self._channels) or 'none'})"
            )
        self._providers[spec.name] = spec

    def channel(self, name: str) -> ChannelSpec:
        try:
            return self._channels[name]
        except KeyError:
            known = ", ".join(self._channels) or "none"
            raise UnknownChannel(f"no channel named {name!r} (registered: {known})") from None

    def channels(self) -> tuple[ChannelSpec, ...]:
        return tuple(self._channels.values())

    def channel_names(self, *, sendable: bool = False) -> tuple[str, ...]:
        """Every channel's name, or with ``sendable`` only those with a provider."""
        if not sendable:
            return tuple(self._channels)
        served = {p.channel for p in self._providers.values()}
        return tuple(name for name in self._channels if name in served)

    def providers(self, channel: str | None = None) -> tuple[ProviderSpec, ...]:
        """Every provider, or those of ``channel`` (its default first)."""
        return tuple(p for p in self._providers.values() if channel is None or p.channel == channel)

    def provider(self, name: str) -> ProviderSpec:
        try:
            return self._providers[name]
        except KeyError:
            known = ", ".join(self._providers) or "none"
            raise UnknownChannel(f"no provider named {name!r} (registered: {known})") from None

    def provider_for(self, channel: str) -> ProviderSpec:
        """The channel's default provider: the first registered for it."""
        spec = self.channel(channel)
        for provider in self._providers.values():
            if provider.channel == spec.name:
                return provider
        raise UnknownChannel(f"channel {channel!r} has no provider yet")

    def batch_limit(self, channel: str) -> int | None:
        """Most recipients one request of the channel's default provider carries, for batch APIs
        (SendGrid: 1,000); None for per-message APIs and channels without a provider."""
        providers = self.providers(channel)
        if not providers or providers[0].messages_per_request <= 1:
            return None
        return providers[0].messages_per_request

    def batch_limits(self) -> dict[str, int]:
        """:meth:`batch_limit` of every channel that has one."""
        limits = {name: self.batch_limit(name) for name in self._channels}
        return {name: limit for name, limit in limits.items() if limit is not None}

    def __contains__(self, name: object) -> bool:
        return name in self._channels


#: Builds a channel; its arguments are the caller's (usually a session and a config).
ChannelFactory = Callable[..., Channel]


class ChannelRegistry:
    """Adapter factories by name, for building adapters by hand. A second registration of a name
    is refused. (The registry of channels and providers is :class:`Registry`.)"""

    def __init__(self) -> None:
        self._factories: dict[str, ChannelFactory] = {}

    def register(self, name: str, factory: ChannelFactory) -> None:
        if name in self._factories:
            raise DuplicateChannel(f"a channel named {name!r} is already registered")
        self._factories[name] = factory

    def create(self, name: str, *args: Any, **kwargs: Any) -> Channel:
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise UnknownChannel(f"no channel named {name!r} (registered: {known})") from None
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
