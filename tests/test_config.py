from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import pytest

from dispatch.config import Settings, load_settings
from dispatch.errors import ConfigError


def test_defaults_need_nothing() -> None:
    settings = load_settings({})
    assert settings.redis_url is None
    assert settings.broker_db != settings.app_db
    assert settings.heartbeat_timeout_ms <= 10_000  # redelivery within seconds, not minutes


def test_env_values_are_typed() -> None:
    settings = load_settings({"DISPATCH_BATCH_SIZE": "250", "DISPATCH_SMS_RATE": "99.5", "DISPATCH_HOME": "/x"})
    assert settings.batch_size == 250
    assert settings.sms_rate == 99.5
    assert settings.home == Path("/x")


@pytest.mark.parametrize(
    ("env", "setting", "words"),
    [
        ({"DISPATCH_BATCH_SIZE": "lots"}, "DISPATCH_BATCH_SIZE", "whole number"),
        ({"DISPATCH_BATCH_SIZE": "0"}, "DISPATCH_BATCH_SIZE", "from 1 to 10000"),
        ({"DISPATCH_SMS_HONOURS_IDEMPOTENCY": "maybe"}, "DISPATCH_SMS_HONOURS_IDEMPOTENCY", "true or false"),
        ({"DISPATCH_BATCHSIZE": "5"}, "DISPATCH_BATCHSIZE", "unknown setting"),
        ({"DISPATCH_REDIS_URL": "http://x"}, "DISPATCH_REDIS_URL", "redis://"),
        ({"DISPATCH_REDIS_URL": "redis://h:1/1"}, "DISPATCH_BROKER_DB", "another database"),
    ],
)
def test_invalid_settings_name_the_setting_and_the_fix(env: dict[str, str], setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.setting == setting
    assert words in str(info.value)
    assert "Fix:" in str(info.value)


def test_toml_file_then_env_wins(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.toml"
    path.write_text("[dispatch]\nbatch_size = 123\nworkers = 3\n")
    settings = load_settings({"DISPATCH_WORKERS": "4"}, config_file=path)
    assert settings.batch_size == 123
    assert settings.workers == 4


def test_toml_unknown_key_and_bad_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("batchsize = 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings({}, config_file=path)
    path.write_text("batch_size = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({}, config_file=path)


def test_home_defaults_to_an_absolute_per_user_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same for every process of the user, whatever directory it starts in
    assert load_settings({"XDG_DATA_HOME": "/data/ann"}).home == Path("/data/ann/dispatch")
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert load_settings({"HOME": "/home/ann"}).home == Path("/home/ann/.local/share/dispatch")
    # a relative XDG_DATA_HOME is ignored, as the XDG spec says
    assert load_settings({"HOME": "/home/ann", "XDG_DATA_HOME": "data"}).home == Path("/home/ann/.local/share/dispatch")
    assert load_settings({}).home.is_absolute()


def test_a_relative_home_is_made_absolute_when_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings({"DISPATCH_HOME": "state"})
    assert settings.home == Path(os.getcwd()) / "state"
    # a worker started elsewhere is handed the same directory
    from loadtest.cluster import settings_env

    monkeypatch.chdir("/")
    assert load_settings(settings_env(settings)).home == settings.home
    assert load_settings({"DISPATCH_HOME": "~/state"}).home == Path.home() / "state"


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.batch_size = 1  # type: ignore[misc]


def test_readme_documents_every_setting() -> None:
    from dispatch.config import describe_settings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for env, default, _help in describe_settings():
        assert f"| `{env}` | `{default}` |" in readme, f"README's settings table lacks {env} (default {default})"


# --- audience sources ----------------------------------------------------------------------------

SECRET = "s3cr3t-pw"


def test_sources_from_toml_tables_beside_dispatch_and_from_env_json(tmp_path: Path) -> None:
    from dispatch.config import AudienceSources, FileSource, PostgresSource

    path = tmp_path / "dispatch.toml"
    path.write_text(
        "[dispatch]\nbatch_size = 100\n\n"
        f'[sources.crm]\nkind = "postgres"\ndsn = "postgresql://reader:{SECRET}@db/crm"\nquery = "select * from c"\n\n'
        '[sources.nightly]\nkind = "file"\npath = "/data/nightly.csv.gz"\n'
    )
    settings = load_settings({}, config_file=path)
    assert settings.batch_size == 100
    assert settings.sources == AudienceSources(
        [
            PostgresSource(name="crm", dsn=f"postgresql://reader:{SECRET}@db/crm", query="select * from c"),
            FileSource(name="nightly", path=Path("/data/nightly.csv.gz")),
        ]
    )
    assert SECRET not in repr(settings) and "crm=postgres" in repr(settings)
    # the env form replaces the file's sources; str() is that form (how settings reach child processes)
    env = load_settings({"DISPATCH_SOURCES": '{"x": {"kind": "file", "path": "/x.jsonl"}}'}, config_file=path)
    assert list(env.sources) == ["x"]
    assert load_settings({"DISPATCH_SOURCES": str(settings.sources)}).sources == settings.sources
    assert load_settings({}).sources == AudienceSources() and str(Settings().sources) == "{}"
    nested = tmp_path / "nested.toml"
    nested.write_text('[dispatch.sources.n]\nkind = "file"\npath = "/n.csv"\n')
    assert list(load_settings({}, config_file=nested).sources) == ["n"]


@pytest.mark.parametrize(
    ("sources", "words"),
    [
        ('{"crm": {"kind": "mysql", "dsn": "x"}}', "unknown kind"),
        ('{"crm": {"kind": "postgres", "dsn": "postgresql://u:' + SECRET + '@h/d"}}', "query missing"),
        ('{"crm": {"kind": "postgres", "dsn": "mysql://u:' + SECRET + '@h/d", "query": "q"}}', "not a PostgreSQL DSN"),
        ('{"crm": {"kind": "postgres", "dsn": "' + SECRET + '", "query": "q", "pass": "x"}}', "unknown key(s) pass"),
        ('{"n": {"kind": "file", "path": "data/x.csv"}}', "relative"),
        ('{"n": {"kind": "file", "path": "/data/x.parquet"}}', "cannot tell the format"),
        ('{"bad name": {"kind": "file", "path": "/x.csv"}}', "invalid source name"),
        ('{"crm": "postgresql://u:' + SECRET + '@h/d"}', "expected a table"),
        ('{"crm": ', "not valid JSON"),
    ],
)
def test_invalid_sources_name_the_source_and_never_quote_a_dsn(sources: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"DISPATCH_SOURCES": sources})
    assert info.value.setting.startswith("DISPATCH_SOURCES")
    assert words in str(info.value) and "Fix:" in str(info.value)
    assert SECRET not in str(info.value)


# --- the model checks every way settings are built ---------------------------------------------


@pytest.mark.parametrize(
    ("build", "setting", "words"),
    [
        (lambda: Settings(batch_size=0), "DISPATCH_BATCH_SIZE", "from 1 to 10000"),
        (lambda: replace(Settings(), workers=0), "DISPATCH_WORKERS", "from 1 to 256"),
        (lambda: replace(Settings(), sms_rate=-1.0), "DISPATCH_SMS_RATE", "at least 0"),
        (lambda: replace(Settings(), batch_size="lots"), "DISPATCH_BATCH_SIZE", "whole number"),
        (lambda: replace(Settings(), batch_sise=5), "DISPATCH_BATCH_SISE", "unknown setting"),
        (lambda: replace(Settings(), redis_url="redis://h/1"), "DISPATCH_BROKER_DB", "another database"),
    ],
    ids=["direct-bound", "replace-bound", "replace-float-bound", "replace-text", "replace-unknown", "replace-cross"],
)
def test_direct_and_replaced_settings_are_checked_like_loaded_ones(
    build: Callable[[], Settings], setting: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.setting == setting
    assert words in str(info.value) and "Fix:" in str(info.value)


def test_replace_parses_text_and_keeps_the_rest() -> None:
    settings = load_settings({"DISPATCH_BATCH_SIZE": "250"})
    changed = replace(settings, workers="4", sms_auth_token="t0ken-value")  # type: ignore[arg-type]
    assert changed.workers == 4 and changed.batch_size == 250
    assert changed.sms_auth_token.reveal() == "t0ken-value" and "t0ken-value" not in repr(changed)
    assert replace(changed, workers=2, sms_auth_token=settings.sms_auth_token) == settings


def test_toml_values_of_the_wrong_type_name_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "dispatch.toml"
    for text, setting, words in [
        ("batch_size = 5.5\n", "DISPATCH_BATCH_SIZE", "whole number"),
        ("worker_sched_idle = 'maybe'\n", "DISPATCH_WORKER_SCHED_IDLE", "true or false"),
        ("sms_auth_token = 5\n", "DISPATCH_SMS_AUTH_TOKEN", "expected text"),
        ("[dispatch]\nmetrics_port = 70000\n", "DISPATCH_METRICS_PORT", "from 0 to 65535"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings({}, config_file=path)
        assert info.value.setting == setting and words in str(info.value), text


def test_describe_settings_comes_from_the_model_fields() -> None:
    from dispatch.config import describe_settings

    rows = {env: (default, text) for env, default, text in describe_settings()}
    assert len(rows) == len(fields(Settings))
    assert rows["DISPATCH_BATCH_SIZE"][0] == "500" and "recipients per batch" in rows["DISPATCH_BATCH_SIZE"][1]
    assert rows["DISPATCH_REDIS_URL"][0] == "unset" and rows["DISPATCH_WORKER_SCHED_IDLE"][0] == "false"
    assert rows["DISPATCH_SMS_AUTH_TOKEN"][0] == "dispatch-demo-token"  # demo defaults are shown
