"""Provider adapters, each speaking one provider's public wire format, and the registry of
channels and providers (``channels.registry``; the standard one: :func:`default_registry`)."""

from channels.base import Channel, Message, Permanent, Result, Retryable, Sent
from channels.errors import (
    ChannelConfigError,
    ChannelError,
    DuplicateChannel,
    DuplicateProvider,
    PermanentProviderError,
    ProviderAccountError,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnreachable,
    RetryableProviderError,
    UnknownChannel,
)
from channels.registry import BodyLimits, ChannelSpec, ProviderSettings, ProviderSpec, Registry
from channels.standard import default_registry

__all__ = [
    "BodyLimits",
    "Channel",
    "ChannelConfigError",
    "ChannelError",
    "ChannelSpec",
    "DuplicateChannel",
    "DuplicateProvider",
    "Message",
    "Permanent",
    "PermanentProviderError",
    "ProviderAccountError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderSettings",
    "ProviderSpec",
    "ProviderTimeout",
    "ProviderUnreachable",
    "Registry",
    "Result",
    "Retryable",
    "RetryableProviderError",
    "Sent",
    "UnknownChannel",
    "default_registry",
]
