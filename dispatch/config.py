"""Settings: one typed, immutable object built once at start-up.

Sources, later ones winning: the defaults below, an optional TOML file (``DISPATCH_CONFIG`` or
``--config``; keys are the setting names, e.g. ``batch_size = 500``, optionally under a
``[dispatch]`` table), then ``DISPATCH_*`` environment variables (``DISPATCH_BATCH_SIZE``).
:class:`Settings` is a frozen pydantic dataclass whose fields carry their default, description and
bounds: the loader only collects raw values, the model parses and checks them (also on
``Settings(...)`` and ``dataclasses.replace(settings, ...)``). Every invalid value raises
``ConfigError`` naming the setting and the fix. Nothing here reads the environment or the disk at
import time.

``home`` (``DISPATCH_HOME``), where a deployment keeps its embedded server, plans and secrets, is
always absolute once loaded: unset, it is ``$XDG_DATA_HOME/dispatch`` or ``~/.local/share/dispatch``
(the same for every process of the user, whatever its working directory); a relative value is
taken relative to the working directory of the process that loads it.

Secret settings (provider tokens and keys, the API-key pepper, the suppression key, the receipt
webhook secret, ``api_token``) are :class:`Secret` values: ``repr``, ``str`` and formatting show
``'**********'`` (so does ``repr(Settings)``, which also masks the Redis URL's password); code that
hands one to a library calls ``.reveal()``.

Named audience sources (setting ``sources``; planned by name with ``dispatch plan --audience
source:NAME`` or the API's ``{"audience": {"source": NAME}}``, see ``dispatch.plan.sources``) are one
TOML table each::

    [sources.crm]
    kind = "postgres"                 # a query read through a server-side cursor
    dsn = "postgresql://reader:secret@db.internal/crm"
    query = "select id, phone, first_name from contacts where opted_in"

    [sources.nightly]
    kind = "file"                     # CSV or JSONL on the server, optionally .gz
    path = "/data/exports/nightly.csv"

or ``DISPATCH_SOURCES`` holding the same as JSON (``{"crm": {"kind": "postgres", ...}}``), which
replaces the file's sources as a whole. A DSN may hold a password: it is never shown (``repr``,
errors and API answers leave it out); ``str()`` of the sources is that JSON form, secrets
included, for handing settings to child processes only.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, cast, get_args
from urllib.parse import parse_qs, urlsplit

import annotated_types
from pydantic import (
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import dataclasses as pydantic_dataclasses
from pydantic.fields import FieldInfo

from dispatch.credentials import Secret, redact_url
from dispatch.errors import ConfigError

__all__ = [
    "DEFAULT_HOME",
    "IN_DOUBT_ACTIONS",
    "SOURCE_NAME_PATTERN",
    "AudienceSource",
    "AudienceSources",
    "FileSource",
    "PostgresSource",
    "Secret",
    "Settings",
    "default_home",
    "describe_settings",
    "in_doubt_policies",
    "load_settings",
]

ENV_PREFIX = "DISPATCH_"
#: Names of audience sources: what a CLI argument and a URL-free JSON field carry safely.
SOURCE_NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
#: File suffixes a file source may have (optionally followed by ``.gz``).
_FILE_SUFFIXES: Final = (".csv", ".jsonl", ".ndjson")


@dataclass(frozen=True, kw_only=True)
class PostgresSource:
    """A query read through a server-side cursor (``dispatch.plan.audience.from_postgres``). ``dsn``
    is a secret (it may hold a password): it is left out of ``repr`` and of every message."""

    kind: ClassVar[str] = "postgres"
    name: str
    dsn: str = field(repr=False)
    query: str

    def as_config(self) -> dict[str, str]:
        return {"kind": self.kind, "dsn": self.dsn, "query": self.query}


@dataclass(frozen=True, kw_only=True)
class FileSource:
    """A CSV or JSONL file (optionally gzip) on the planning host, planned with
    ``Planner.plan_file`` (a large plain CSV file is scanned on every core)."""

    kind: ClassVar[str] = "file"
    name: str
    path: Path

    def as_config(self) -> dict[str, str]:
        return {"kind": self.kind, "path": str(self.path)}


AudienceSource = PostgresSource | FileSource


class AudienceSources(Mapping[str, AudienceSource]):
    """The deployment's named audience sources (immutable). ``str()`` is the ``DISPATCH_SOURCES``
    JSON form, DSNs included (for child processes only); ``repr()`` never shows a DSN."""

    __slots__ = ("_items",)

    def __init__(self, sources: Iterable[AudienceSource] = ()) -> None:
        items: dict[str, AudienceSource] = {}
        for source in sources:
            items[source.name] = source
        self._items = items

    def __getitem__(self, name: str) -> AudienceSource:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.values()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AudienceSources):
            return self._items == other._items
        return NotImplemented

    def __str__(self) -> str:
        return json.dumps({name: source.as_config() for name, source in self._items.items()})

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={source.kind}" for name, source in self._items.items())
        return f"AudienceSources({shown})"

    @classmethod
    def parse(cls, raw: Any, where: str) -> AudienceSources:
        """Sources from a TOML table or the JSON text of ``DISPATCH_SOURCES``; ``where`` names the
        setting in errors. Raises ConfigError (never quoting a DSN)."""
        if isinstance(raw, AudienceSources):
            return raw
        if isinstance(raw, str):
            try:
                raw = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    where,
                    f"not valid JSON ({exc.msg} at character {exc.pos})",
                    'use {"NAME": {"kind": "postgres", "dsn": "...", "query": "..."}} or {"NAME": '
                    '{"kind": "file", "path": "/abs/path.csv"}}',
                ) from None
        if not isinstance(raw, Mapping):
            raise ConfigError(where, "expected a table of named sources", "write [sources.NAME] tables")
        return cls(_parse_source(str(name), spec, where) for name, spec in raw.items())


def _parse_source(name: str, spec: Any, where: str) -> AudienceSource:
    at = f"{where}: {name}"
    if not re.fullmatch(SOURCE_NAME_PATTERN, name):
        raise ConfigError(at, "invalid source name", "use 1-64 letters, digits, '_' or '-'")
    if not isinstance(spec, Mapping):
        raise ConfigError(at, "expected a table with kind = 'postgres' or 'file'", f"write [sources.{name}]")
    kind = spec.get("kind")
    expected = {"postgres": {"kind", "dsn", "query"}, "file": {"kind", "path"}}
    if kind not in expected:
        raise ConfigError(at, f"unknown kind {kind!r}", "set kind = 'postgres' (dsn, query) or 'file' (path)")
    unknown = sorted(set(spec) - expected[str(kind)])
    if unknown:
        raise ConfigError(at, f"unknown key(s) {', '.join(unknown)}", f"a {kind} source takes {sorted(expected[kind])}")
    missing = sorted(k for k in expected[str(kind)] if not isinstance(spec.get(k), str) or not spec[k].strip())
    if missing:
        given = " and ".join(missing)
        raise ConfigError(at, f"{', '.join(missing)} missing or empty", f"give the {kind} source {given}")
    if kind == "postgres":
        dsn = str(spec["dsn"])
        if not (dsn.startswith(("postgresql://", "postgres://")) or "=" in dsn):
            raise ConfigError(at, "dsn is not a PostgreSQL DSN", "use postgresql://... or libpq key=value settings")
        return PostgresSource(name=name, dsn=dsn, query=str(spec["query"]))
    path = Path(str(spec["path"]))
    if not path.is_absolute():
        raise ConfigError(at, f"path {str(path)!r} is relative", "give the absolute path on the planning host")
    if not path.name.lower().removesuffix(".gz").endswith(_FILE_SUFFIXES):
        raise ConfigError(at, f"cannot tell the format of {path.name!r}", "name it .csv or .jsonl (optionally .gz)")
    return FileSource(name=name, path=path)


#: ``DISPATCH_HOME`` when neither it nor ``XDG_DATA_HOME`` is set, expanded by :func:`load_settings`.
#: An absolute per-user directory, so that every process of a deployment (CLI, workers, API),
#: whatever its working directory, finds the same embedded server, plans and secrets.
DEFAULT_HOME: Final = Path("~/.local/share/dispatch")


def default_home(environ: Mapping[str, str]) -> Path:
    """Where a deployment lives when ``DISPATCH_HOME`` is unset: ``$XDG_DATA_HOME/dispatch`` (the
    XDG base directory spec; a relative value is ignored, as the spec says), else
    ``~/.local/share/dispatch``. The user's directories come from ``environ``, then from the
    process's own environment (they describe the user, not the deployment)."""
    xdg = environ.get("XDG_DATA_HOME") or os.environ.get("XDG_DATA_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "dispatch"
    user_home = environ.get("HOME") or os.path.expanduser("~")
    return _absolute_home(Path(user_home, *DEFAULT_HOME.parts[1:]))


def _absolute_home(home: Path) -> Path:
    """``home`` as every process reads it: ``~`` expanded, relative to the working directory of the
    process that loads the settings (a worker started elsewhere is handed the absolute path)."""
    return Path(os.path.abspath(home.expanduser()))


#: The mock provider's (and demo's) Twilio auth token: public, so it verifies no receipt.
DEMO_SMS_AUTH_TOKEN: Final = "dispatch-demo-token"

#: Longest suppression key: BLAKE2b takes keys of at most 64 bytes.
_MAX_SUPPRESSION_KEY_BYTES: Final = 64


@pydantic_dataclasses.dataclass(
    frozen=True, kw_only=True, config=ConfigDict(arbitrary_types_allowed=True, extra="forbid")
)
class Settings:
    """Every setting of a deployment. Build with :func:`load_settings`.

    A pydantic dataclass: each field carries its default, its description (the README's table) and
    its bounds; building one (directly, through :func:`load_settings` or ``dataclasses.replace``)
    parses text the way ``DISPATCH_*`` variables are written, checks bounds and the cross-field
    rules, and raises :class:`ConfigError` naming the variable and the fix."""

    home: Path = Field(
        default=DEFAULT_HOME,
        description="state directory (embedded Redis data, plans, secrets, metrics files), made absolute when read; "
        "unset: $XDG_DATA_HOME/dispatch if XDG_DATA_HOME is set",
    )
    redis_url: str | None = Field(default=None, description="Redis/Valkey URL for application keys; unset = embedded")
    broker_db: int = Field(
        default=1, ge=0, le=15, description="logical database of the dramatiq broker (apart from app keys)"
    )
    heartbeat_timeout_ms: int = Field(
        default=5000,
        ge=1000,
        le=600_000,
        description="ms without a heartbeat before a worker's batches are redelivered",
    )
    maintenance_chance: int = Field(
        default=100_000, ge=1, le=1_000_000, description="broker commands per million that run queue maintenance"
    )
    workers: int = Field(default=2, ge=1, le=256, description="worker processes started by demo and loadtest")
    worker_threads: int = Field(default=2, ge=1, le=64, description="batches one worker process runs at once")
    worker_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="CPU niceness of worker processes (10: an API sharing their cores keeps its latency)",
    )
    worker_sched_idle: bool = Field(
        default=False,
        description="workers run under SCHED_IDLE: the API and Redis preempt them at once (they only get idle CPU)",
    )
    send_concurrency: int = Field(
        default=256, ge=1, le=10_000, description="provider requests in flight per worker process"
    )
    batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="recipients per batch (one broker message) of per-message APIs; batch APIs: their limit",
    )
    in_doubt: str = Field(
        default="hold",
        description="what happens to a message whose request may have reached a provider that cannot tell "
        "(no lookup API, or no answer within in_doubt_wait_s): hold (dead-lettered as in_doubt for an operator), "
        "resend (risk a duplicate) or drop (risk a miss); one value, or per provider: twilio=hold,fcm=resend,*=hold",
    )
    in_doubt_wait_s: float = Field(
        default=120.0,
        ge=0,
        le=86400,
        description="seconds a message in doubt waits for evidence (a provider lookup that failed, a delivery receipt) "
        "before the in_doubt policy decides",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=50,
        description="provider attempts per message before dead-lettering; provider trouble (connection errors, "
        "timeouts, 5xx, 429) is retried until retry_horizon_s instead",
    )
    retry_horizon_s: float = Field(
        default=3600.0,
        ge=0,
        description="how long a batch's messages are retried through provider trouble before they are "
        "dead-lettered (never past the campaign's deadline); 0: after max_attempts",
    )
    breaker_window_s: float = Field(default=10.0, gt=0, description="seconds of provider answers a breaker looks at")
    breaker_min_failures: int = Field(
        default=20, ge=1, description="least provider-trouble answers in the window that open its breaker"
    )
    breaker_failure_ratio: float = Field(
        default=0.5, gt=0, le=1, description="share of provider trouble in the window that opens its breaker"
    )
    breaker_open_s: float = Field(
        default=2.0, gt=0, description="seconds an opened breaker waits before one probe request"
    )
    breaker_max_open_s: float = Field(
        default=5.0, gt=0, description="longest wait between two probes (doubles after each failed probe)"
    )
    breaker_probe_lease_s: float = Field(
        default=15.0, gt=0, description="how long one worker holds a breaker's probe before another may take it"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="worker log lines: text, or one JSON object per line"
    )
    sms_base_url: str = Field(
        default="http://127.0.0.1:8099", description="Twilio API base URL (or the mock provider's)"
    )
    sms_account_sid: str = Field(default="AC00000000000000000000000000000000", description="Twilio account SID")
    sms_auth_token: Secret = Field(default=Secret(DEMO_SMS_AUTH_TOKEN), description="Twilio auth token")
    sms_from: str = Field(default="+15005550006", description="sender number (E.164)")
    sms_rate: float = Field(default=0.0, ge=0, description="SMS segments per second for the account; 0 = unlimited")
    sms_honours_idempotency: bool = Field(
        default=False,
        description="the SMS endpoint honours Idempotency-Key (real Twilio does not: a message in doubt is looked up "
        "in Twilio's Messages list before it is sent again; true only for a proxy that deduplicates)",
    )
    sms_providers: str = Field(
        default="twilio",
        description="SMS providers in priority order (e.g. twilio,aliyun): the next takes over when one's breaker "
        "is open or it cannot reach a destination",
    )
    sms_routes: str = Field(
        default="",
        description="SMS providers by destination prefix, longest prefix first (e.g. +86=aliyun,twilio;+852=aliyun)",
    )
    aliyun_base_url: str = Field(
        default="http://127.0.0.1:8099/aliyun", description="Aliyun SMS (dysmsapi) base URL (or the mock provider's)"
    )
    aliyun_access_key_id: str = Field(default="LTAI-mock-access-key", description="Aliyun AccessKey ID")
    aliyun_access_key_secret: Secret = Field(
        default=Secret("mock-aliyun-secret"), description="Aliyun AccessKey secret"
    )
    aliyun_sign_name: str = Field(default="dispatch", description="Aliyun SMS signature name (approved)")
    aliyun_template_code: str = Field(
        default="SMS_000000", description="Aliyun SMS template whose one parameter, content, takes the body"
    )
    email_base_url: str = Field(
        default="http://127.0.0.1:8099", description="SendGrid API base URL (or the mock provider's)"
    )
    email_api_key: Secret = Field(default=Secret("SG.mock-api-key"), description="SendGrid API key")
    email_from: str = Field(default="campaigns@example.com", description="sender address")
    email_unsubscribe_url: str = Field(
        default="https://example.com/unsubscribe/{ref}",
        description="one-click unsubscribe URL; {ref} is the message reference",
    )
    email_honours_idempotency: bool = Field(
        default=False,
        description="the email endpoint honours Idempotency-Key (SendGrid does not: an email in doubt is looked up in "
        "the Email Activity API where email_activity_api is set, else follows in_doubt; true only for an endpoint "
        "that deduplicates)",
    )
    email_activity_api: bool = Field(
        default=False,
        description="the SendGrid account has the Email Activity API (a paid add-on): in-doubt emails are looked up "
        "there before any resend",
    )
    push_base_url: str = Field(
        default="http://127.0.0.1:8099", description="FCM HTTP v1 base URL (or the mock provider's)"
    )
    push_project: str = Field(default="dispatch-demo", description="FCM project id")
    push_access_token: Secret = Field(default=Secret("mock-fcm-access-token"), description="FCM OAuth access token")
    push_service_account_file: Path | None = Field(
        default=None,
        description="FCM service-account JSON key: workers mint and share hourly OAuth tokens from it "
        "(replaces push_access_token)",
    )
    webhook_url: str = Field(
        default="http://127.0.0.1:8099/webhook", description="URL signed webhook messages are posted to"
    )
    webhook_secret: Secret = Field(
        default=Secret("mock-webhook-secret"), description="HMAC secret of the webhook channel (>= 16 chars)"
    )
    webhook_honours_idempotency: bool = Field(default=True, description="the webhook receiver honours Idempotency-Key")
    frequency_limit: int = Field(
        default=0, ge=0, description="messages per recipient per channel in the window (0 = no cap)"
    )
    frequency_window_s: int = Field(default=86_400, ge=1, description="rolling frequency-cap window in seconds")
    api_url: str | None = Field(
        default=None, description="with it, CLI commands go through this dispatch API instead of Redis"
    )
    api_token: Secret | None = Field(default=None, description="bearer token for api_url (dispatch apikey create)")
    api_key_pepper: Secret = Field(
        default=Secret(""), description="secret mixed into stored API-key hashes (a dump alone cannot test tokens)"
    )
    suppression_key: Secret = Field(
        default=Secret(""),
        description="secret key of the suppression-list address hashes, the same on every process; "
        "unset: the key generated in $DISPATCH_HOME/suppression.key",
    )
    api_max_json_bytes: int = Field(default=1024 * 1024, ge=1024, description="largest JSON request body of the API")
    api_max_audience_bytes: int = Field(default=2 * 1024**3, ge=1024, description="largest audience upload of the API")
    api_header_timeout_s: float = Field(
        default=10.0, ge=0.1, description="seconds a client of the API may take to send a request's line and headers"
    )
    api_keepalive_timeout_s: float = Field(
        default=75.0, ge=0.1, description="seconds an idle keep-alive connection to the API stays open"
    )
    api_max_connections: int = Field(
        default=1000,
        ge=1,
        description="connections the API keeps open at most (over it, the longest idle one is closed)",
    )
    plan_max_rows: int = Field(
        default=100_000_000, ge=1, description="most audience rows one plan reads; a larger audience fails the plan"
    )
    plan_max_decompressed_bytes: int = Field(
        default=32 * 1024**3, ge=1024, description="most bytes a gzip audience may expand to; more fails the plan"
    )
    plan_max_gzip_ratio: int = Field(
        default=100,
        ge=1,
        description="most bytes a gzip audience may expand to per compressed byte (plus 1 MiB); more fails the plan",
    )
    plan_max_rejected_file_bytes: int = Field(
        default=256 * 1024**2,
        ge=4096,
        description="largest rejected-rows file of a plan; rejects past it are counted in the report, not listed",
    )
    sendgrid_public_key: str | None = Field(
        default=None, description="SendGrid event-webhook verification key (base64 DER or PEM)"
    )
    receipt_webhook_secret: Secret | None = Field(
        default=None, description="HMAC secret of signed webhook delivery receipts"
    )
    callback_base_url: str | None = Field(default=None, description="public base URL providers post receipts to")
    link_base_url: str | None = Field(
        default=None,
        description="public base URL of tracked links (<base>/r/<token>, served by `dispatch serve`); "
        "unset: callback_base_url",
    )
    link_key: Secret = Field(
        default=Secret(""),
        description="secret key of tracked-link tokens, the same on every process; "
        "unset: the key generated in $DISPATCH_HOME/link.key",
    )
    aliyun_reply_secret: Secret | None = Field(
        default=None, description="secret in the query (?token=) of the Aliyun SMS reply push URL; unset: no route"
    )
    reply_window_s: int = Field(
        default=7 * 86400, ge=60, description="seconds an SMS reply is matched to the last message sent to its number"
    )
    provider_latency_ms: float = Field(default=20.0, ge=0, description="expected provider latency for predictions")
    cpu_per_message_us: float = Field(
        default=352.0,
        ge=1,
        description="CPU microseconds one message costs over all local processes at the reference speed, "
        "for predictions",
    )
    cpu_speed_probe: bool = Field(
        default=True,
        description="scale predicted CPU costs by the measured speed of the workers (or this machine); "
        "off: fixed costs",
    )
    speed_probe_quiet_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="workers probe the machine's speed only while the rest of it uses at most this share of "
        "its CPUs (1 = probe however busy it is)",
    )
    metrics_port: int = Field(default=0, ge=0, le=65535, description="port of a worker's /metrics endpoint (0 = none)")
    retention_s: int = Field(default=7 * 86400, ge=60, description="seconds campaign data is kept after it ends")
    prices: str = Field(
        default="",
        description="price per message by provider for reports, e.g. twilio=0.0079,sendgrid=0.0009 (unset: no cost)",
    )
    sources: AudienceSources = Field(
        default=AudienceSources(),
        description="named audience sources, [sources.NAME] tables in the TOML file or JSON here (see Configuration)",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _parse(cls, raw: Any, info: ValidationInfo) -> Any:
        """Text as written in ``DISPATCH_*`` variables (or a TOML value) to the field's type."""
        return _convert(str(info.field_name), raw)

    @model_validator(mode="wrap")
    @classmethod
    def _name_the_setting(cls, data: Any, handler: ModelWrapValidatorHandler[Settings]) -> Settings:
        """A failed type or bounds check becomes a ConfigError naming the variable and the fix."""
        try:
            return handler(data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @model_validator(mode="after")
    def _check_together(self) -> Settings:
        in_doubt_policies(self.in_doubt)
        if len(self.suppression_key.reveal().encode()) > _MAX_SUPPRESSION_KEY_BYTES:
            raise ConfigError(
                "DISPATCH_SUPPRESSION_KEY",
                f"longer than {_MAX_SUPPRESSION_KEY_BYTES} bytes",
                "use at most 64 bytes (e.g. the 64 hex digits of $DISPATCH_HOME/suppression.key)",
            )
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in {"redis", "rediss", "unix"}:
                raise ConfigError(
                    "DISPATCH_REDIS_URL",
                    f"scheme {parts.scheme!r} is not redis://, rediss:// or unix://",
                    "use a URL like redis://127.0.0.1:6379/0, or unset it to use the embedded server",
                )
            if self.app_db == self.broker_db:
                raise ConfigError(
                    "DISPATCH_BROKER_DB",
                    f"the broker shares database {self.broker_db} with the application keys",
                    "pick another database number for DISPATCH_BROKER_DB (dramatiq's maintenance runs KEYS)",
                )
        return self

    def __repr__(self) -> str:
        # Secrets print as masks by themselves; the Redis URL keeps its host but not its password.
        shown = []
        for name in _FIELDS:
            value = getattr(self, name)
            text = repr(redact_url(value)) if name == "redis_url" and value is not None else repr(value)
            shown.append(f"{name}={text}")
        return f"Settings({', '.join(shown)})"

    @property
    def app_db(self) -> int:
        if self.redis_url is None:
            return 0
        parts = urlsplit(self.redis_url)
        query_db = parse_qs(parts.query).get("db", [""])[-1]
        if query_db.isdigit():  # redis-py's order: ?db= first, then the path (a unix:// path is the socket)
            return int(query_db)
        path = parts.path.strip("/")
        return int(path) if path.isdigit() and parts.scheme != "unix" else 0


#: The model's fields (name -> pydantic FieldInfo: default, description, bounds), in declaration order.
_FIELDS: Final[dict[str, FieldInfo]] = cast(Any, Settings).__pydantic_fields__


def _kind(annotation: Any) -> type[Any]:
    """The type a field holds, ``None`` aside (``str | None`` -> ``str``)."""
    kinds = [k for k in (get_args(annotation) or (annotation,)) if k is not type(None)]
    return cast(type[Any], kinds[0])


#: name -> (the type it holds, whether it may be unset).
_KINDS: Final = {
    name: (_kind(info.annotation), type(None) in get_args(info.annotation)) for name, info in _FIELDS.items()
}
#: How an error names what a setting of each type expects.
_EXPECTED: Final[dict[type[Any], str]] = {bool: "true or false", int: "a whole number", float: "a number"}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(name: str, raw: Any) -> Any:
    """``raw`` (text from the environment, a TOML value, or an already typed value) as the type of
    setting ``name``. Raises ConfigError on text that is not of that type; bounds are the model's."""
    kind, optional = _KINDS[name]
    env = _env_name(name)
    if kind is AudienceSources:
        return AudienceSources.parse(raw, env)
    if raw is None or (optional and isinstance(raw, str) and raw == ""):
        return None
    if kind is Secret:
        if isinstance(raw, Secret):
            return raw
        if not isinstance(raw, str):
            raise ConfigError(env, f"expected text, got {type(raw).__name__}", f"set {env} to text")
        return Secret(raw)
    try:
        value: Any
        if kind is bool:
            if isinstance(raw, bool):
                value = raw
            elif str(raw).strip().lower() in {"1", "true", "yes", "on"}:
                value = True
            elif str(raw).strip().lower() in {"0", "false", "no", "off"}:
                value = False
            else:
                raise ValueError
        elif kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            value = int(str(raw).strip()) if isinstance(raw, str) else int(raw)
        elif kind is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        elif kind is Path:
            value = Path(str(raw))
        else:
            value = str(raw)
    except (TypeError, ValueError):
        expected = _EXPECTED.get(kind, "text")
        raise ConfigError(env, f"expected {expected}, got {raw!r}", f"set {env} to {expected}") from None
    return value


def _bounds(name: str) -> tuple[Any, Any]:
    """(lowest, highest) value of setting ``name``; None where unbounded."""
    metadata = _FIELDS[name].metadata
    low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in metadata if isinstance(m, annotated_types.Le)), None)
    return low, high


def _config_error(exc: ValidationError) -> ConfigError:
    """The model's first complaint as a ConfigError: which variable, what is wrong, the fix."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    env = _env_name(name)
    if name not in _FIELDS:  # Settings(unknown=...) or replace(settings, unknown=...)
        return ConfigError(env, "unknown setting", f"use one of: {', '.join(sorted(_FIELDS))}")
    if error["type"] in {"greater_than_equal", "less_than_equal"}:
        low, high = _bounds(name)
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        return ConfigError(env, f"{error['input']!r} is out of range", f"set {env} to a value {bounds}")
    expected = _EXPECTED.get(_KINDS[name][0], "text")  # never quote the input: it may be a secret
    return ConfigError(env, f"expected {expected}, got {type(error['input']).__name__}", f"set {env} to {expected}")


def _read_toml(path: Path) -> dict[str, Any]:
    """The settings table of the TOML file at ``path``: ``[dispatch]`` (or the top level), with
    ``[sources.NAME]`` tables beside it parsed here so that their errors name the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("DISPATCH_CONFIG", f"cannot read {path}: {exc.strerror}", "point it at a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("DISPATCH_CONFIG", f"{path} is not valid TOML ({exc})", "fix the file's syntax") from None
    table = data.get("dispatch", data)
    if table is not data and "sources" in data:  # [sources.NAME] tables beside [dispatch]
        if "sources" in table:
            raise ConfigError(f"{path}: sources", "defined twice", "keep either [sources] or [dispatch.sources]")
        table = {**table, "sources": data["sources"]}
    for key in table:
        if key not in _FIELDS:
            raise ConfigError(f"{path}: {key}", "unknown setting", f"use one of: {', '.join(sorted(_FIELDS))}")
    if "sources" in table:
        table = {**table, "sources": AudienceSources.parse(table["sources"], f"{path}: sources")}
    return dict(table)


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment and overrides: this
    collects the raw values, later sources winning; the model parses and checks them."""
    environ = os.environ if env is None else env
    path = config_file or (Path(environ["DISPATCH_CONFIG"]) if environ.get("DISPATCH_CONFIG") else None)
    values: dict[str, Any] = {} if path is None else _read_toml(path)
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "DISPATCH_CONFIG" or key.startswith("DISPATCH_TEST_"):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            raise ConfigError(key, "unknown setting", f"remove it, or use one of: {', '.join(sorted(_FIELDS))}")
        values[name] = raw
    values.update(overrides or {})
    values["home"] = _absolute_home(Path(values["home"])) if "home" in values else default_home(environ)
    return Settings(**values)


def describe_settings() -> list[tuple[str, str, str]]:
    """(environment variable, default, help) for every setting, for docs and ``--help``."""

    def shown(value: Any) -> str:
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, Secret):  # the defaults are demo values, not secrets
            return value.reveal()
        return str(value)

    return [(_env_name(name), shown(info.default), str(info.description)) for name, info in _FIELDS.items()]


#: What may happen to a message in doubt (see ``Settings.in_doubt``).
IN_DOUBT_ACTIONS: Final = ("hold", "resend", "drop")


def in_doubt_policies(text: str) -> dict[str, str]:
    """``Settings.in_doubt`` as provider -> action (``"*"``: every other provider)."""
    policies: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        provider, sep, action = part.rpartition("=")
        provider = provider.strip() if sep else "*"
        action = action.strip()
        if action not in IN_DOUBT_ACTIONS or not provider:
            raise ConfigError(
                "DISPATCH_IN_DOUBT",
                f"{part!r} is not one of {', '.join(IN_DOUBT_ACTIONS)}",
                "give one action, or provider=action pairs, e.g. twilio=hold,fcm=resend,*=hold",
            )
        policies[provider] = action
    policies.setdefault("*", "hold")
    return policies
