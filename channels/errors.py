"""Exceptions raised by the ``channels`` package.

The tree::

    ChannelError
    ├── ChannelConfigError      a channel was built with missing or invalid settings
    ├── DuplicateChannel        a registry already holds a channel of that name
    ├── DuplicateProvider       a registry already holds a provider of that name
    ├── UnknownChannel          no channel (or provider) of that name is registered
    └── ProviderError           the provider call failed as a whole (not per message)
        ├── RetryableProviderError   worth retrying; carries ``retry_after`` when the provider said
        │   ├── ProviderTimeout
        │   ├── ProviderConnectionError
        │   │   └── ProviderUnreachable  no connection could be made: the request never left
        │   └── ProviderRateLimited  (429)
        └── PermanentProviderError   retrying cannot help (bad credentials, malformed request)
            └── ProviderAccountError     the provider refuses the account, not a message (401/403,
                                         wrong account or project, exhausted balance): fixable by
                                         an operator, so the caller pauses rather than fails

Per-message outcomes are *results* (see ``channels.base``), not exceptions: a batch in which one
recipient is invalid still sends the others.
"""

from __future__ import annotations

__all__ = [
    "ChannelConfigError",
    "ChannelError",
    "DuplicateChannel",
    "DuplicateProvider",
    "PermanentProviderError",
    "ProviderAccountError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderTimeout",
    "ProviderUnreachable",
    "RetryableProviderError",
    "UnknownChannel",
]


class ChannelError(Exception):
    """Root of every error raised by ``channels``."""


class ChannelConfigError(ChannelError):
    """A channel was configured with missing or invalid settings."""


class DuplicateChannel(ChannelError):
    """A channel with this name is already registered."""


class DuplicateProvider(ChannelError):
    """A provider with this name is already registered."""


class UnknownChannel(ChannelError):
    """No channel with this name is registered."""


class ProviderError(ChannelError):
    """A provider call failed as a whole."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class RetryableProviderError(ProviderError):
    """A failure worth retrying; ``retry_after`` is the provider's hint in seconds, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ProviderTimeout(RetryableProviderError):
    """The provider did not answer in time."""


class ProviderConnectionError(RetryableProviderError):
    """The connection failed or was reset."""


class ProviderUnreachable(ProviderConnectionError):
    """No connection could be made (refused, no route, DNS): the request never left, so the
    message is not in doubt and may go to another provider."""


class ProviderRateLimited(RetryableProviderError):
    """The provider answered 429."""


class PermanentProviderError(ProviderError):
    """Retrying cannot help (bad credentials, malformed request)."""


class ProviderAccountError(PermanentProviderError):
    """The provider refuses the account (credentials, project, balance): no message is at fault.

    Its text names the provider and the setting to check; never a token or an address.
    """
