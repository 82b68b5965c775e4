"""Plan a campaign from a configured audience source (setting ``sources``, see ``dispatch.config``).

    source = find_source(settings, "crm")
    report = plan_from_source(Planner.for_settings(client, settings), spec, source)

A ``postgres`` source streams its query through a server-side cursor
(``dispatch.plan.audience.from_postgres``); a ``file`` source is planned with ``Planner.plan_file`` (a
large plain CSV file is scanned on every core). The CLI (``dispatch plan --audience source:NAME``)
and the API (``POST /v1/campaigns`` with ``{"audience": {"source": NAME}}``) both go through here.

Errors name the source, never its DSN: :class:`SourceUnavailable` (an ``AudienceError``) when the
database cannot be reached, ``AudienceError`` when the source cannot be read, ``ConfigError``
for an unknown name. The texts of driver errors are scrubbed of the DSN and its password.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from dispatch.config import AudienceSource, FileSource, Settings
from dispatch.errors import AudienceError, ConfigError
from dispatch.plan.audience import from_postgres

if TYPE_CHECKING:
    from dispatch.campaign import CampaignSpec
    from dispatch.plan.planner import Planner, PlanReport

__all__ = ["SOURCE_PREFIX", "SourceUnavailable", "find_source", "parse_reference", "plan_from_source", "plan_postgres"]

#: ``--audience source:NAME`` names a configured source.
SOURCE_PREFIX: Final = "source:"
#: Seconds to wait for the audience database unless the DSN says otherwise.
CONNECT_TIMEOUT_S: Final = 10


class SourceUnavailable(AudienceError):
    """The source's database cannot be reached (a server-side outage, not the request's fault)."""


def parse_reference(audience: str) -> str | None:
    """The source name of a ``source:NAME`` audience argument (None for a file or a DSN)."""
    return audience[len(SOURCE_PREFIX) :] if audience.startswith(SOURCE_PREFIX) else None


def find_source(settings: Settings, name: str) -> AudienceSource:
    """The configured source ``name``; ConfigError listing the configured names otherwise."""
    source = settings.sources.get(name)
    if source is None:
        known = ", ".join(sorted(settings.sources)) or "none"
        raise ConfigError(
            "DISPATCH_SOURCES",
            f"no audience source named {name!r} (configured: {known})",
            "declare it as a [sources.NAME] table in the settings file or in DISPATCH_SOURCES",
        )
    return source


def plan_from_source(planner: Planner, spec: CampaignSpec, source: AudienceSource) -> PlanReport:
    """Plan ``spec`` from ``source`` (blocking: run it off the event loop)."""
    if isinstance(source, FileSource):
        try:
            return planner.plan_file(spec, source.path)
        except AudienceError as exc:
            raise AudienceError(f"source {source.name!r}: {exc}") from None
    return plan_postgres(planner, spec, source.dsn, source.query, what=f"source {source.name!r}")


def plan_postgres(planner: Planner, spec: CampaignSpec, dsn: str, query: str, *, what: str) -> PlanReport:
    """Plan from a PostgreSQL query through a server-side cursor; ``what`` names the source in
    errors (the DSN never appears in them)."""
    try:
        import psycopg
    except ImportError:
        raise AudienceError("PostgreSQL audiences need psycopg: pip install 'dispatch[postgres]'") from None
    options: dict[str, Any] = {} if "connect_timeout" in dsn else {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        conn = psycopg.connect(dsn, **options)
    except psycopg.Error as exc:
        raise SourceUnavailable(f"{what}: cannot connect to the audience database ({type(exc).__name__})") from None
    try:
        with conn:
            return planner.plan(spec, from_postgres(conn, query))
    except AudienceError as exc:
        raise AudienceError(f"{what}: {_scrub(str(exc), dsn)}") from None


def _scrub(text: str, dsn: str) -> str:
    """``text`` without the DSN or its password (driver messages are not ours to trust)."""
    secrets = [dsn]
    if "://" in dsn:
        password = urlsplit(dsn).password
        if password:
            secrets.append(password)
    else:
        secrets += [part.split("=", 1)[1] for part in dsn.split() if part.startswith("password=")]
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
