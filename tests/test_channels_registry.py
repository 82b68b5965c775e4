"""The registry of channels and providers (``channels.registry``, ``channels.standard``): it refuses
duplicates, every channel a campaign can use has a provider, and every channel list in dispatch is
the registry's."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from channels import (
    ChannelConfigError,
    ChannelSpec,
    DuplicateChannel,
    DuplicateProvider,
    ProviderSettings,
    ProviderSpec,
    Registry,
    UnknownChannel,
    default_registry,
)
from channels.base import Channel, Message, Result, Sent
from channels.email import SendGridEmail
from channels.push import FcmPush
from channels.sms import TwilioSms
from channels.standard import SMS, WECHAT
from channels.webhook import SignedWebhook
from dispatch.config import Settings
from dispatch.credentials import Secret
from dispatch.rules.suppression import GLOBAL


class OtherSms(Channel):
    """A second SMS provider: an adapter class, a factory and a spec are all it takes."""

    name = "sms"
    provider = "othersms"

    def __init__(self, sender: str) -> None:
        self.sender = sender

    async def send(self, messages: Sequence[Message]) -> list[Result]:
        return [Sent(m.ref, m.ref) for m in messages]


OTHER_SMS = ProviderSpec(
    adapter=OtherSms,
    settings_section="sms",
    factory=lambda session, settings: OtherSms(settings.text("from")),
)


def test_duplicate_names_and_unknown_channels_are_refused() -> None:
    registry = Registry()
    registry.add_channel(SMS)
    with pytest.raises(DuplicateChannel, match="'sms'"):
        registry.add_channel(ChannelSpec(name="sms", address_field="phone", address_kind="sms_number"))
    with pytest.raises(UnknownChannel, match="'email'"):
        registry.add_provider(default_registry().provider("sendgrid"))
    registry.add_provider(default_registry().provider("twilio"))
    with pytest.raises(DuplicateProvider, match="'twilio'"):
        registry.add_provider(default_registry().provider("twilio"))
    with pytest.raises(UnknownChannel, match="registered: sms"):
        registry.channel("push")
    with pytest.raises(ChannelConfigError):
        ChannelSpec(name="Bad Name", address_field="phone", address_kind="sms_number")


def test_default_registry_is_built_fresh_each_time() -> None:
    first, second = default_registry(), default_registry()
    assert first is not second
    first.add_provider(OTHER_SMS)
    assert [p.name for p in second.providers("sms")] == ["twilio", "aliyun"]


def test_every_channel_a_campaign_can_use_has_a_provider() -> None:
    registry = default_registry()
    assert registry.channel_names() == ("sms", "email", "push", "webhook", "wechat")
    assert registry.channel_names(sendable=True) == ("sms", "email", "push", "webhook")
    for name in registry.channel_names(sendable=True):
        assert registry.provider_for(name).channel == name
    # wechat is declared without a provider: validated, consented to, suppressed, never sent
    assert [c.name for c in registry.channels() if not registry.providers(c.name)] == [WECHAT.name]
    with pytest.raises(UnknownChannel, match="no provider"):
        registry.provider_for("wechat")
    assert {p.name: p.channel for p in registry.providers()} == {
        "twilio": "sms",
        "aliyun": "sms",
        "sendgrid": "email",
        "fcm": "push",
        "webhook": "webhook",
    }


def test_specs_declare_what_the_channels_and_providers_are() -> None:
    registry = default_registry()
    assert {c.name: (c.address_field, c.address_kind, c.consent_column) for c in registry.channels()} == {
        "sms": ("phone", "sms_number", "consent_sms"),
        "email": ("email", "email", "consent_email"),
        "push": ("push_token", "push_token", "consent_push"),
        "webhook": ("webhook_url", "url", "consent_webhook"),
        "wechat": ("openid", "openid", "consent_wechat"),
    }
    assert registry.channel("sms").limits.max_chars == 1600  # Twilio error 21617 above it
    assert registry.channel("push").limits.max_bytes == 4096
    assert registry.channel("email").limits.subject_required
    assert registry.channel("sms").cost("x" * 161) == 2 and registry.channel("sms").cost_per_body
    assert registry.channel("email").cost("x" * 161) == 1 and not registry.channel("email").cost_per_body
    twilio, sendgrid, fcm = (registry.provider(n) for n in ("twilio", "sendgrid", "fcm"))
    assert (twilio.receipts, twilio.lookup_api, twilio.max_batch, twilio.messages_per_request) == (
        "status_callback",
        True,
        100,
        1,
    )
    assert (sendgrid.max_batch, sendgrid.messages_per_request, sendgrid.receipts) == (1000, 1000, "event_webhook")
    assert (fcm.receipts, fcm.idempotency_configurable, fcm.lookup_api) == ("none", False, False)
    assert not any(p.honours_idempotency_keys for p in registry.providers())
    assert registry.batch_limits() == {"email": 1000}


def test_a_second_provider_of_a_channel_does_not_replace_the_default() -> None:
    registry = default_registry()
    registry.add_provider(OTHER_SMS)
    assert [p.name for p in registry.providers("sms")] == ["twilio", "aliyun", "othersms"]
    assert registry.provider_for("sms").name == "twilio"


def test_provider_settings_name_the_setting_and_reveal_secrets_only_on_request() -> None:
    settings = ProviderSettings(section="sms", values={"auth_token": Secret("t0ken"), "rate": 1.0, "flag": "yes"})
    assert settings.text("auth_token") == "t0ken"
    assert "t0ken" not in repr(settings)
    with pytest.raises(ChannelConfigError, match="sms_from is missing"):
        settings.text("from")
    with pytest.raises(ChannelConfigError, match="sms_rate must be text"):
        settings.text("rate")
    with pytest.raises(ChannelConfigError, match="sms_flag must be true or false"):
        settings.flag("flag")


# -- dispatch derives its lists from the registry -------------------------------------------------


def test_campaign_api_and_openapi_lists_are_the_registrys() -> None:
    from dispatch.api.openapi import openapi_document
    from dispatch.api.schemas import SCHEMAS, SUPPRESSION_LISTS
    from dispatch.campaign import CHANNELS

    sendable = default_registry().channel_names(sendable=True)
    assert sendable == CHANNELS
    assert (*sendable, GLOBAL) == SUPPRESSION_LISTS
    assert SCHEMAS["CampaignSpec"]["properties"]["channel"]["enum"] == list(sendable)
    assert SCHEMAS["SuppressionAdd"]["properties"]["channel"]["enum"] == [*sendable, GLOBAL]
    document = openapi_document()
    parameters = document["paths"]["/v1/suppressions/{channel}/{address}"]["delete"]["parameters"]
    channel = next(p for p in parameters if p["name"] == "channel")
    assert channel["schema"]["enum"] == [*sendable, GLOBAL]


def test_audience_validation_and_planner_lists_are_the_registrys() -> None:
    from dispatch.plan.audience import ADDRESS_FIELDS, ColumnMap, Recipient
    from dispatch.plan.planner import PROVIDER_BATCH_LIMITS
    from dispatch.plan.prediction import BATCH_CHANNEL_CPU_S, SIZE_SLOPE
    from dispatch.rules.validation import ADDRESS_FIELD, AddressValidator

    registry = default_registry()
    assert dict(ADDRESS_FIELD) == {c.name: c.address_field for c in registry.channels()}
    assert tuple(c.address_field for c in registry.channels()) == ADDRESS_FIELDS
    recipient_fields = {f.name for f in dataclasses.fields(Recipient)}
    column_fields = {f.name for f in dataclasses.fields(ColumnMap)}
    assert set(ADDRESS_FIELDS) <= recipient_fields & column_fields
    assert dict(ColumnMap().consent) == {c.name: c.consent_column for c in registry.channels()}
    validator = AddressValidator("DE")
    for name in registry.channel_names():  # every channel has a check (unknown ones raise)
        reason, _ = validator.check(name, "not an address at all")
        assert reason is not None
    with pytest.raises(ValueError, match="unknown channel"):
        validator.check("fax", "+4915123456789")
    assert registry.batch_limits() == PROVIDER_BATCH_LIMITS
    assert set(SIZE_SLOPE) == set(registry.channel_names(sendable=True))
    assert set(BATCH_CHANNEL_CPU_S) == set(registry.batch_limits())


def test_command_line_choices_are_the_registrys() -> None:
    from dispatch.cli.plan import CHANNELS
    from loadtest.runner import CHANNELS as LOADTEST_CHANNELS

    registry = default_registry()
    assert (*registry.channel_names(), GLOBAL) == CHANNELS
    assert registry.channel_names(sendable=True) == LOADTEST_CHANNELS


async def test_the_worker_builds_each_channels_default_provider_from_its_settings() -> None:
    from dispatch.send.runtime import build_channels

    settings = Settings(callback_base_url="https://hooks.example.com/", sms_from="+15005550007")
    async with aiohttp.ClientSession() as session:
        built = build_channels(settings, session)
        assert list(built) == list(default_registry().channel_names(sendable=True))
        assert [type(a) for a in built.values()] == [TwilioSms, SendGridEmail, FcmPush, SignedWebhook]
        sms = built["sms"]
        assert isinstance(sms, TwilioSms)
        assert sms.config.status_callback_url == "https://hooks.example.com/callbacks/twilio"
        assert sms.config.from_number == "+15005550007"
        assert sms.config.auth_token == settings.sms_auth_token.reveal()
        email = built["email"]
        assert isinstance(email, SendGridEmail) and email.config.api_key == settings.email_api_key.reveal()

        registry = Registry()
        registry.add_channel(SMS)
        registry.add_provider(OTHER_SMS)
        other = build_channels(settings, session, registry)
        assert list(other) == ["sms"]
        assert isinstance(other["sms"], OtherSms) and other["sms"].sender == "+15005550007"


def test_a_channel_without_a_provider_can_be_suppressed_but_not_used_by_a_campaign(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dispatch.campaign import CampaignSpec
    from dispatch.cli import main
    from dispatch.errors import PlanError

    monkeypatch.setenv("DISPATCH_REDIS_URL", redis_url)
    monkeypatch.setenv("DISPATCH_HOME", str(tmp_path))
    monkeypatch.delenv("DISPATCH_CONFIG", raising=False)
    assert main(["suppress", "add", "wechat", "oLVPpjqs9BhvzwPj5A-vTYAX3GLc"]) == 0
    assert "wechat: 1 added" in capsys.readouterr().out
    assert main(["suppress", "add", "wechat", "short"]) == 2
    with pytest.raises(PlanError, match="'wechat' is not one of sms, email, push, webhook"):
        CampaignSpec(id="c", channel="wechat", body="hi")
