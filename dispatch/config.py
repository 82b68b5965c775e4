"""Settings: one typed, immutable object built once at start-up.

Sources, later ones winning: the defaults below, an optional TOML file (``DISPATCH_CONFIG`` or
``--config``; keys are the setting names, e.g. ``batch_size = 500``, optionally under a
``[dispatch]`` table), then ``DISPATCH_*`` environment variables (``DISPATCH_BATCH_SIZE``).
Every invalid value raises ``ConfigError`` naming the setting and the fix. Nothing here runs at
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

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final
from urllib.parse import parse_qs, urlsplit

from dispatch.credentials import Secret, redact_url
from dispatch.errors import ConfigError

__all__ = [
    "DEFAULT_HOME",
    "SOURCE_NAME_PATTERN",
    "AudienceSource",
    "AudienceSources",
    "FileSource",
    "PostgresSource",
    "Secret",
    "Settings",
    "default_home",
    "describe_settings",
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


def _setting(default: Any, help: str, *, low: float | None = None, high: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "low": low, "high": high})


def _secret(default: str | None, help: str) -> Any:
    """A secret setting: a :class:`Secret` (never printed; ``.reveal()`` gives the value)."""
    value = None if default is None else Secret(default)
    return field(default=value, metadata={"help": help, "low": None, "high": None, "secret": True})


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


#: Longest suppression key: BLAKE2b takes keys of at most 64 bytes.
_MAX_SUPPRESSION_KEY_BYTES: Final = 64


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of a deployment. Build with :func:`load_settings`."""

    home: Path = _setting(
        DEFAULT_HOME,
        "state directory (embedded Redis data, plans, secrets, metrics files), made absolute when read; "
        "unset: $XDG_DATA_HOME/dispatch if XDG_DATA_HOME is set",
    )
    redis_url: str | None = _setting(None, "Redis/Valkey URL for application keys; unset = embedded")
    broker_db: int = _setting(1, "logical database of the dramatiq broker (apart from app keys)", low=0, high=15)
    heartbeat_timeout_ms: int = _setting(
        5000, "ms without a heartbeat before a worker's batches are redelivered", low=1000, high=600_000
    )
    maintenance_chance: int = _setting(
        100_000, "broker commands per million that run queue maintenance", low=1, high=1_000_000
    )
    workers: int = _setting(2, "worker processes started by demo and loadtest", low=1, high=256)
    worker_threads: int = _setting(2, "batches one worker process runs at once", low=1, high=64)
    worker_nice: int = _setting(
        0,
        "CPU niceness of worker processes (10: an API sharing their cores keeps its latency)",
        low=0,
        high=19,
    )
    worker_sched_idle: bool = _setting(
        False,
        "workers run under SCHED_IDLE: the API and Redis preempt them at once (they only get idle CPU)",
    )
    send_concurrency: int = _setting(256, "provider requests in flight per worker process", low=1, high=10_000)
    batch_size: int = _setting(
        500,
        "recipients per batch (one broker message) of per-message APIs; batch APIs: their limit",
        low=1,
        high=10_000,
    )
    max_attempts: int = _setting(5, "provider attempts per message before dead-lettering", low=1, high=50)
    sms_base_url: str = _setting("http://127.0.0.1:8099", "Twilio API base URL (or the mock provider's)")
    sms_account_sid: str = _setting("AC00000000000000000000000000000000", "Twilio account SID")
    sms_auth_token: Secret = _secret("dispatch-demo-token", "Twilio auth token")
    sms_from: str = _setting("+15005550006", "sender number (E.164)")
    sms_rate: float = _setting(0.0, "SMS segments per second for the account; 0 = unlimited", low=0)
    sms_honours_idempotency: bool = _setting(
        True, "the SMS endpoint honours Idempotency-Key (the mock does; real Twilio does not)"
    )
    email_base_url: str = _setting("http://127.0.0.1:8099", "SendGrid API base URL (or the mock provider's)")
    email_api_key: Secret = _secret("SG.mock-api-key", "SendGrid API key")
    email_from: str = _setting("campaigns@example.com", "sender address")
    email_unsubscribe_url: str = _setting(
        "https://example.com/unsubscribe/{ref}", "one-click unsubscribe URL; {ref} is the message reference"
    )
    email_honours_idempotency: bool = _setting(True, "the email endpoint honours Idempotency-Key (the mock does)")
    push_base_url: str = _setting("http://127.0.0.1:8099", "FCM HTTP v1 base URL (or the mock provider's)")
    push_project: str = _setting("dispatch-demo", "FCM project id")
    push_access_token: Secret = _secret("mock-fcm-access-token", "FCM OAuth access token")
    webhook_url: str = _setting("http://127.0.0.1:8099/webhook", "URL signed webhook messages are posted to")
    webhook_secret: Secret = _secret("mock-webhook-secret", "HMAC secret of the webhook channel (>= 16 chars)")
    webhook_honours_idempotency: bool = _setting(True, "the webhook receiver honours Idempotency-Key")
    frequency_limit: int = _setting(0, "messages per recipient per channel in the window (0 = no cap)", low=0)
    frequency_window_s: int = _setting(86_400, "rolling frequency-cap window in seconds", low=1)
    api_url: str | None = _setting(None, "with it, CLI commands go through this dispatch API instead of Redis")
    api_token: Secret | None = _secret(None, "bearer token for api_url (dispatch apikey create)")
    api_key_pepper: Secret = _secret("", "secret mixed into stored API-key hashes (a dump alone cannot test tokens)")
    suppression_key: Secret = _secret(
        "",
        "secret key of the suppression-list address hashes, the same on every process; "
        "unset: the key generated in $DISPATCH_HOME/suppression.key",
    )
    api_max_json_bytes: int = _setting(1024 * 1024, "largest JSON request body of the API", low=1024)
    api_max_audience_bytes: int = _setting(2 * 1024**3, "largest audience upload of the API", low=1024)
    api_header_timeout_s: float = _setting(
        10.0, "seconds a client of the API may take to send a request's line and headers", low=0.1
    )
    api_keepalive_timeout_s: float = _setting(
        75.0, "seconds an idle keep-alive connection to the API stays open", low=0.1
    )
    api_max_connections: int = _setting(
        1000, "connections the API keeps open at most (over it, the longest idle one is closed)", low=1
    )
    plan_max_rows: int = _setting(
        100_000_000, "most audience rows one plan reads; a larger audience fails the plan", low=1
    )
    plan_max_decompressed_bytes: int = _setting(
        32 * 1024**3, "most bytes a gzip audience may expand to; more fails the plan", low=1024
    )
    plan_max_gzip_ratio: int = _setting(
        100,
        "most bytes a gzip audience may expand to per compressed byte (plus 1 MiB); more fails the plan",
        low=1,
    )
    plan_max_rejected_file_bytes: int = _setting(
        256 * 1024**2,
        "largest rejected-rows file of a plan; rejects past it are counted in the report, not listed",
        low=4096,
    )
    sendgrid_public_key: str | None = _setting(None, "SendGrid event-webhook verification key (base64 DER or PEM)")
    receipt_webhook_secret: Secret | None = _secret(None, "HMAC secret of signed webhook delivery receipts")
    callback_base_url: str | None = _setting(None, "public base URL providers post receipts to")
    provider_latency_ms: float = _setting(20.0, "expected provider latency for predictions", low=0)
    cpu_per_message_us: float = _setting(
        352.0,
        "CPU microseconds one message costs over all local processes at the reference speed, for predictions",
        low=1,
    )
    cpu_speed_probe: bool = _setting(
        True, "scale predicted CPU costs by the measured speed of the workers (or this machine); off: fixed costs"
    )
    speed_probe_quiet_share: float = _setting(
        0.25,
        "workers probe the machine's speed only while the rest of it uses at most this share of its CPUs "
        "(1 = probe however busy it is)",
        low=0,
        high=1,
    )
    metrics_port: int = _setting(0, "port of a worker's /metrics endpoint (0 = none)", low=0, high=65535)
    retention_s: int = _setting(7 * 86400, "seconds campaign data is kept after it ends", low=60)
    sources: AudienceSources = _setting(
        AudienceSources(),
        "named audience sources, [sources.NAME] tables in the TOML file or JSON here (see Configuration)",
    )

    def __post_init__(self) -> None:
        for name in _SECRET_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str):  # Settings(sms_auth_token="...") or replace(): wrap it
                object.__setattr__(self, name, Secret(value))
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

    def __repr__(self) -> str:
        # Secrets print as masks by themselves; the Redis URL keeps its host but not its password.
        shown = []
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            text = repr(redact_url(value)) if item.name == "redis_url" and value is not None else repr(value)
            shown.append(f"{item.name}={text}")
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


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_SECRET_FIELDS: Final = tuple(name for name, f in _FIELDS.items() if f.metadata.get("secret"))


def _convert(name: str, raw: Any) -> Any:
    spec = _FIELDS[name]
    env = ENV_PREFIX + name.upper()
    if name == "sources":
        return AudienceSources.parse(raw, env)
    if spec.metadata.get("secret"):
        if raw is None or isinstance(raw, Secret):
            return raw
        if not isinstance(raw, str):
            raise ConfigError(env, f"expected text, got {type(raw).__name__}", f"set {env} to text")
        return None if raw == "" and spec.default is None else Secret(raw)
    kind: type[Any] = type(spec.default) if spec.default is not None else str
    if raw is None or (isinstance(raw, str) and raw == "" and spec.default is None):
        return None
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
        elif issubclass(kind, Path):
            value = Path(str(raw))
        else:
            value = str(raw)
    except ValueError:
        expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
        raise ConfigError(env, f"expected {expected}, got {raw!r}", f"set {env} to {expected}") from None
    low, high = spec.metadata["low"], spec.metadata["high"]
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(env, f"{value!r} is out of range", f"set {env} to a value {bounds}")
    return value


def load_settings(
    env: Mapping[str, str] | None = None,
    *,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment and overrides."""
    environ = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or (Path(environ["DISPATCH_CONFIG"]) if environ.get("DISPATCH_CONFIG") else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                "DISPATCH_CONFIG", f"cannot read {path}: {exc.strerror}", "point it at a TOML file"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("DISPATCH_CONFIG", f"{path} is not valid TOML ({exc})", "fix the file's syntax") from None
        table = data.get("dispatch", data)
        if table is not data and "sources" in data:  # [sources.NAME] tables beside [dispatch]
            if "sources" in table:
                raise ConfigError(f"{path}: sources", "defined twice", "keep either [sources] or [dispatch.sources]")
            table = {**table, "sources": data["sources"]}
        for key, raw in table.items():
            if key not in _FIELDS:
                raise ConfigError(f"{path}: {key}", "unknown setting", f"use one of: {', '.join(sorted(_FIELDS))}")
            values[key] = AudienceSources.parse(raw, f"{path}: sources") if key == "sources" else _convert(key, raw)
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == "DISPATCH_CONFIG" or key.startswith("DISPATCH_TEST_"):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in _FIELDS:
            raise ConfigError(key, "unknown setting", f"remove it, or use one of: {', '.join(sorted(_FIELDS))}")
        values[name] = _convert(name, raw)
    for name, raw in (overrides or {}).items():
        values[name] = _convert(name, raw)
    values["home"] = _absolute_home(values["home"]) if "home" in values else default_home(environ)
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

    return [
        (ENV_PREFIX + f.name.upper(), shown(f.default), str(f.metadata["help"])) for f in dataclasses.fields(Settings)
    ]
