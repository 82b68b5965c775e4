"""Provider adapters: each speaks one provider's public wire format."""

from channels.base import Channel, Message, Permanent, Result, Retryable, Sent
from channels.errors import (
    ChannelConfigError,
    ChannelError,
    DuplicateChannel,
    PermanentProviderError,
    ProviderConnectionError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    RetryableProviderError,
    UnknownChannel,
)

__all__ = [
    "Channel",
    "ChannelConfigError",
    "ChannelError",
    "DuplicateChannel",
    "Message",
    "Permanent",
    "PermanentProviderError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "Result",
    "Retryable",
    "RetryableProviderError",
    "Sent",
    "UnknownChannel",
]
