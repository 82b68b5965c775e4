"""Several providers per channel: which provider carries a message, and where it goes next.

Settings name a channel's providers in priority order and, optionally, routes by destination
prefix (longest prefix wins; other destinations use the priority order)::

    DISPATCH_SMS_PROVIDERS=twilio,aliyun
    DISPATCH_SMS_ROUTES=+86=aliyun,twilio;+852=aliyun

Failover (``dispatch.send.engine.SendStep``) goes down a message's candidates:

- a provider whose breaker is open (``dispatch.send.health``) is skipped: the message goes to the
  next candidate whose breaker admits it; when none does, it waits (``retry``);
- a refusal marked ``reroutable`` (the provider does not reach that destination, or its own
  per-number cap) excludes that provider for the message, which goes to the next candidate in the
  same run; with no candidate left the refusal stands (``failed``);
- a message whose fate at a provider is **in doubt** (a timeout or a connection lost after the
  request left: ``Retryable.ambiguous``) is pinned to that provider: retried only there, never
  sent to another blindly. ``SendStep.in_doubt`` is the hook where reconciliation (asking the
  provider whether it took the message) plugs in. The pin holds for the run; a later run of the
  batch starts from the candidates again, which is safe only once reconciliation has settled the
  message (the claim path's job for messages in flight).

Each send result names the provider that carried the message (``Item.provider``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from channels.base import Channel
from dispatch.errors import ConfigError

__all__ = ["Route", "Router", "parse_providers", "parse_routes"]


@dataclass(frozen=True, slots=True)
class Route:
    """Destinations starting with ``prefix`` go to ``providers``, in that order."""

    prefix: str
    providers: tuple[str, ...]


def parse_providers(text: str, setting: str) -> tuple[str, ...]:
    """``twilio,aliyun`` -> ``("twilio", "aliyun")``; empty: no list (the channel's default)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if len(set(names)) != len(names):
        raise ConfigError(setting, f"{text!r} names a provider twice", "name each provider once, in priority order")
    return names


def parse_routes(text: str, setting: str) -> tuple[Route, ...]:
    """``+86=aliyun,twilio;+852=aliyun`` -> routes (empty text: none)."""
    routes: list[Route] = []
    for entry in (part.strip() for part in text.split(";")):
        if not entry:
            continue
        prefix, sep, providers = entry.partition("=")
        prefix = prefix.strip()
        if not sep or not prefix:
            problem = f"route {entry!r} is not PREFIX=PROVIDER[,PROVIDER...]"
            raise ConfigError(setting, problem, "e.g. +86=aliyun,twilio")
        names = parse_providers(providers, setting)
        if not names:
            raise ConfigError(setting, f"route {entry!r} names no provider", "e.g. +86=aliyun,twilio")
        routes.append(Route(prefix, names))
    if len({route.prefix for route in routes}) != len(routes):
        raise ConfigError(setting, "a prefix is routed twice", "route each prefix once")
    return tuple(routes)


class Router:
    """A channel's providers (adapters by provider name, in priority order) and its routes."""

    def __init__(self, channel: str, adapters: Mapping[str, Channel], routes: Sequence[Route] = ()) -> None:
        if not adapters:
            raise ConfigError(f"DISPATCH_{channel.upper()}_PROVIDERS", "no provider", "name at least one provider")
        for route in routes:
            unknown = [name for name in route.providers if name not in adapters]
            if unknown:
                raise ConfigError(
                    f"DISPATCH_{channel.upper()}_ROUTES",
                    f"route {route.prefix} names {', '.join(unknown)}, not among the channel's providers",
                    f"add it to DISPATCH_{channel.upper()}_PROVIDERS ({', '.join(adapters)})",
                )
        self.channel = channel
        self._adapters = dict(adapters)
        self._default = tuple(self._adapters.values())
        # longest prefix first: the first match is the most specific
        self._routes = sorted(routes, key=lambda route: -len(route.prefix))
        self._by_route = {route.prefix: tuple(self._adapters[name] for name in route.providers) for route in routes}

    @property
    def primary(self) -> Channel:
        return self._default[0]

    @property
    def adapters(self) -> tuple[Channel, ...]:
        """Every provider's adapter, in priority order."""
        return self._default

    def adapter(self, provider: str) -> Channel | None:
        return self._adapters.get(provider)

    def candidates(self, address: str) -> tuple[Channel, ...]:
        """The providers that may carry a message to ``address``, in the order to try them."""
        for route in self._routes:
            if address.startswith(route.prefix):
                return self._by_route[route.prefix]
        return self._default
