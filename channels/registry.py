"""Explicit channel registry: names map to factories; nothing is discovered by scanning.

registry = ChannelRegistry()
registry.register("sms", lambda session, config: TwilioSms(session, config))
sms = registry.create("sms", session, twilio_config)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from channels.base import Channel
from channels.errors import DuplicateChannel, UnknownChannel

__all__ = ["ChannelFactory", "ChannelRegistry"]

#: Builds a channel; its arguments are the caller's (usually a session and a config).
ChannelFactory = Callable[..., Channel]


class ChannelRegistry:
    """Channel factories by name. A second registration of a name is refused."""

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
