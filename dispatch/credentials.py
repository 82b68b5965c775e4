"""Secret values that never print, and the per-deployment secrets kept in ``DISPATCH_HOME``.

:class:`Secret` wraps a credential (a provider token, a pepper, a key): ``repr``, ``str`` and
``format`` give ``'**********'``, so a logged ``Settings`` or an f-string shows no secret; the
value comes out only through :meth:`Secret.reveal`, at the one place that hands it to a library.
:func:`redact_url` shows a URL with its password masked.

:func:`home_secret` reads a secret file of the deployment's home, creating it on first use: a
random value, mode 0600, published with ``link()`` (atomic, fails if the name exists) so two
processes starting at once agree: the loser reads the winner's complete file. A file that others
may read is refused, as is an empty one.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import Final, final
from urllib.parse import urlsplit, urlunsplit

from dispatch.errors import ConfigError

__all__ = ["MASK", "Secret", "home_secret", "redact_url"]

#: What a secret prints as.
MASK: Final = "**********"


@final
class Secret:
    """A secret text: compared by value, never shown. ``bool()`` says whether it is non-empty."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds text, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for handing it to the code that uses it."""
        return self._value

    def __repr__(self) -> str:
        return repr(MASK)

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return format(MASK, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return hmac.compare_digest(self._value.encode(), other._value.encode())
        return NotImplemented

    def __hash__(self) -> int:
        return hash((Secret, self._value))


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by the mask, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{host}", parts.path, parts.query, parts.fragment))


def _check_private(path: Path, mode: int) -> None:
    if mode & 0o077:
        raise ConfigError(
            str(path),
            f"secret file is readable by others (mode {stat.S_IMODE(mode):04o})",
            f"run: chmod 600 {path}",
        )


def home_secret(path: Path, *, nbytes: int = 32) -> Secret:
    """The secret stored at ``path`` (hex text), created with ``nbytes`` random bytes if absent.

    Raises ConfigError when the file is readable by group or others, empty, or unreadable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create(path, secrets.token_hex(nbytes))
            continue  # read back what won: ours, or a concurrent creator's
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the secret file: {exc.strerror}", "check its owner") from None
        with os.fdopen(fd, "rb") as handle:
            _check_private(path, os.fstat(handle.fileno()).st_mode)
            value = handle.read().decode("utf-8", errors="replace").strip()
        if not value:
            raise ConfigError(
                str(path), "secret file is empty", "restore it from a backup (or delete it to start over)"
            )
        return Secret(value)


def _create(path: Path, value: str) -> None:
    """Publish ``value`` at ``path`` unless it exists: written to a private temporary file
    (O_EXCL, 0600), fsynced, then linked into place, so no reader sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
