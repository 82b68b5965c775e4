"""Provider adapters, each speaking one provider's public wire format, and the registry of
channels and providers (``channels.registry``; the standard one: :func:`default_registry`)."""

from channels.base import (
    Channel,
    Found,
    InFlight,
    LookupResult,
    Message,
    NotFound,
    Permanent,
    Result,
    Retryable,
    Sent,
    Undecided,
)
from channels.errors import (
    ChannelConfigError,
    ChannelError,
    DuplicateChannel,
    DuplicateProvider,
    PermanentProviderError,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
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
    "Found",
    "InFlight",
    "LookupResult",
    "Message",
    "NotFound",
    "Permanent",
    "PermanentProviderError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderSettings",
    "ProviderSpec",
    "ProviderTimeout",
    "Registry",
    "Result",
    "Retryable",
    "RetryableProviderError",
    "Sent",
    "Undecided",
    "UnknownChannel",
    "default_registry",
]
