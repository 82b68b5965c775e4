"""The HTTP API's request and response bodies as pydantic models, and the schemas derived from them.

Each body is declared once, here (the campaign spec in ``dispatch.campaign``): requests are
checked with :func:`parse` (every field, unknown fields refused, one :class:`FieldError` per
problem), :data:`SCHEMAS` (the OpenAPI components published by ``dispatch.api.openapi``) is
generated from the same models, and ``response_errors`` checks a live response with the model its
component names. Models and components share their names.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import models_json_schema

from channels import default_registry
from dispatch.api.problems import FieldError
from dispatch.campaign import CAMPAIGN_ID_PATTERN, CHANNELS, MAX_BODY, MAX_SUBJECT, CampaignSpec
from dispatch.config import SOURCE_NAME_PATTERN
from dispatch.models import field_errors, problem
from dispatch.rules.suppression import GLOBAL

__all__ = [
    "CAMPAIGN_ID_PATTERN",
    "CAMPAIGN_PATH_ID_PATTERN",
    "MODELS",
    "SCHEMAS",
    "SUPPRESSION_LISTS",
    "CampaignCreateFromSource",
    "CampaignCreateJson",
    "CampaignPatch",
    "EngagementRecorded",
    "PushOpen",
    "SuppressionAdd",
    "TriggeredMessage",
    "errors_of",
    "parse",
]

#: Campaign ids in a path: a client's, a triggered campaign's (``triggered:sms-2026112512``) or
#: one of the former triggered ids (``triggered-sms-2026112512``).
CAMPAIGN_PATH_ID_PATTERN: Final = r"^(?:[A-Za-z0-9._-]{1,128}|triggered:[a-z]+-[0-9]{10})$"

#: Suppression lists the API serves: one per channel a campaign can use, and the global one.
SUPPRESSION_LISTS: Final = (*CHANNELS, GLOBAL)

_REF_TEMPLATE: Final = "#/components/schemas/{model}"
#: The channels' limits (subject required) that the triggered message model checks.
_REGISTRY: Final = default_registry()

M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    """A request or response body: unknown fields are refused; numbers and strings are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise problem("expected string, number, boolean or null")


#: One audience attribute value in a JSON create.
Scalar = Annotated[
    str | float | bool | None,
    PlainValidator(_scalar),
    WithJsonSchema({"type": ["string", "number", "boolean", "null"]}),
]
Count = Annotated[int, Field(ge=0)]
Verdict = Literal["fits", "at_risk", "does_not_fit", "no_deadline"]


class CampaignCreateJson(_Body):
    spec: CampaignSpec
    recipients: list[
        Annotated[
            dict[str, Scalar],
            Field(max_length=64, description="one audience row: id, phone, email, ..., template attributes"),
        ]
    ] = Field(max_length=10_000)


class AudienceSourceRef(_Body):
    source: str = Field(
        pattern=SOURCE_NAME_PATTERN,
        description="name of an audience source configured on the server ([sources.NAME] in its settings)",
    )


class CampaignCreateFromSource(_Body):
    spec: CampaignSpec
    audience: AudienceSourceRef


class CampaignPatch(_Body):
    rate: float | None = Field(gt=0, description="messages/s; null removes the cap")


class SuppressionAdd(_Body):
    channel: Literal[SUPPRESSION_LISTS]  # type: ignore[valid-type]
    addresses: list[Annotated[str, Field(min_length=1, max_length=2_048)]] = Field(min_length=1, max_length=1_000)


class TriggeredMessage(_Body):
    """One triggered message, on any channel that has a provider (the registry's). The channel's
    own limits (``channels.registry.BodyLimits``) apply on top of these: a subject where it needs
    one (email) here, the rendered body's length at accept (``dispatch.triggered.accept``)."""

    channel: Literal[CHANNELS]  # type: ignore[valid-type]
    to: str = Field(min_length=1, max_length=2_048, description="the recipient's address")
    body: str = Field(
        min_length=1,
        max_length=MAX_BODY,
        description="string.Template ($field); rendered, it must also fit the channel's limit (SMS: 1,600 "
        "characters, push: 4,096 bytes)",
    )
    subject: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SUBJECT,
        validate_default=True,
        description="required where the channel needs one (email); the push title; the webhook's subject",
    )
    attributes: dict[str, Annotated[str, Field(max_length=1_024)]] = Field(default_factory=dict, max_length=64)
    recipient_id: str = Field(default="", min_length=1, max_length=128)
    timezone: str | None = Field(
        default=None, max_length=64, description="IANA zone: holds the message to 08:00-21:00 local"
    )

    @field_validator("subject")
    @classmethod
    def _subject_where_required(cls, subject: str | None, info: ValidationInfo) -> str | None:
        channel = info.data.get("channel")  # absent when the channel itself was refused
        if channel is not None and not (subject or "").strip() and _REGISTRY.channel(channel).limits.subject_required:
            raise problem(f"required for channel {channel} (the provider refuses a message without one)")
        return subject


# --- responses (checked against live answers by the tests) ------------------------------------


class Prediction(_Body):
    messages: Count
    cost_units: Count
    rate: float
    bottleneck: Literal["provider_rate", "campaign_rate", "worker_capacity", "cpu"]
    duration_s: float
    start: float
    finish: float
    deadline: float | None
    verdict: Verdict
    required_rate: float | None
    advice: str
    speed_factor: float = Field(
        default=1.0, description="machine-speed factor the CPU ceiling was scaled by (1: not measured, >1: slower)"
    )
    finish_low: float = Field(default=0.0, description="fast end (10th percentile) of the predicted finish (epoch s)")
    finish_high: float = Field(default=0.0, description="slow end (90th percentile) of the predicted finish (epoch s)")
    duration_low_s: float = Field(default=0.0, description="finish_low - start")
    duration_high_s: float = Field(default=0.0, description="finish_high - start")
    speed_source: Literal["evidence", "workers", "local", "off"] = Field(
        default="off",
        description="where speed_factor came from: this deployment's recent sends (evidence), the workers' or the "
        "planner's synthetic probe, or not measured (off: the campaign's finish does not depend on it)",
    )
    speed_spread: float = Field(default=0.0, description="relative p10-p90 half-width of speed_factor")
    busy_cores: float = Field(default=0.0, description="cores' worth of CPU other processes used while planning")


class PlanReport(_Body):
    campaign_id: str
    total: Count
    accepted: Count
    rejected: dict[str, Count] = Field(description="rows rejected, by reason")
    batches: Count
    cost_units: Count
    prediction: Prediction
    existing: bool = Field(description="true when this id was already planned with this spec")


class CampaignStatus(_Body):
    campaign_id: str
    kind: Literal["campaign", "triggered"]
    channel: str
    state: Literal["planned", "running", "paused", "cancelled", "completed"]
    total: Count
    accepted: Count
    rejected: dict[str, Count]
    batches: Count
    done: Count = Field(description="accepted - pending: messages whose outcome is settled")
    not_sent: Count = Field(
        description="messages that will not be sent: suppressed, skipped, and once cancelled every one neither "
        "sent nor failed (accepted = counters.sent + counters.failed + not_sent + pending, in every state)"
    )
    pending: Count = Field(description="messages queued or in flight (0 once cancelled)")
    counters: dict[str, Count]
    rate: float | None
    current_rate: float = Field(description="live_rate when known, else mean_rate (messages per second)")
    live_rate: float | None = Field(description="messages with an outcome per second over the last ~10 s")
    mean_rate: float = Field(description="messages with an outcome per second since the start (to the end)")
    eta_s: float | None
    eta_at: float | None = Field(description="when the campaign ends at current_rate (epoch seconds)")
    predicted_s: float
    predicted_finish: float | None = Field(description="started_at + predicted_s (epoch seconds)")
    deadline: float | None
    started_at: float | None
    ended_at: float | None = Field(description="when the campaign completed or was cancelled (epoch seconds)")
    as_of: float = Field(description="when this status was read (epoch seconds)")
    speed_factor_plan: float | None = Field(
        default=None, description="the machine-speed factor the plan's prediction used (> 1: slower)"
    )
    speed_factor_now: float | None = Field(
        default=None, description="the live workers' median machine-speed factor now (None: not measured)"
    )
    waiting_for: str | None = Field(
        default=None,
        description="what a running campaign waits for, e.g. 'provider twilio (breaker open since ...)'",
    )
    pause_reason: str | None = Field(
        default=None, description="why a worker paused the campaign (a provider refused the account)"
    )
    eta_rate: float | None = Field(default=None, description="the rate (messages/s) eta_s assumes")
    eta_source: Literal["live", "ramp", "before_gap", "plan", "none"] = Field(
        default="none",
        description="where eta_rate came from: the last ~10 s of progress (live), a blend moving from the plan's rate "
        "to the measured one over the first seconds of progress (ramp), the last rate before a quiet-hours wait "
        "(before_gap), the plan's rate (plan: no measurement yet), none (no estimate)",
    )
    predicted_finish_low: float | None = Field(
        default=None, description="started_at + prediction.duration_low_s (epoch seconds)"
    )
    predicted_finish_high: float | None = Field(
        default=None, description="started_at + prediction.duration_high_s (epoch seconds)"
    )
    verdict: Verdict
    prediction: Prediction


Rate = Annotated[float | None, Field(description="see README 'Reports': denominator delivered where known, else sent")]


class RoundTotals(_Body):
    """Counts summed over rounds, and the rates of the sums."""

    audience: Count
    accepted: Count
    sent: Count
    delivered: Count
    undelivered: Count
    bounced: Count
    failed: Count
    human_opens: Count
    machine_opens: Count
    clicks: Count
    bot_clicks: Count
    replies: Count
    optouts: Count
    spam_reports: Count
    cost: float | None
    delivery_rate: Rate
    open_rate: Rate
    click_rate: Rate


class RoundReport(RoundTotals):
    """One round (campaign): counts, rates, cost and timing (``dispatch.rounds.report``)."""

    campaign_id: str
    channel: str
    provider: str
    derived_from: str | None = Field(description="the campaign this round's audience was derived from")
    where: str | None = Field(description="the expression it was derived with")
    predicted_start: float | None
    predicted_finish: float | None
    started_at: float | None
    ended_at: float | None


class CampaignReport(_Body):
    rounds: list[RoundReport]
    channels: dict[str, RoundTotals]
    providers: dict[str, RoundTotals]


class MessageRecord(_Body):
    message_id: str
    recipient_id: str
    batch: Count
    index: Count
    state: str = Field(description="pending (not claimed yet), sending, sent, delivered, failed, ...")
    attempts: Count
    provider_id: str
    code: str
    ts: float | None


class MessagePage(_Body):
    items: list[MessageRecord]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class PushOpen(_Body):
    """An app's report that the user opened a push message."""

    ref: str = Field(min_length=5, max_length=200, description="the message's ref (message_id), sent in the push data")


class EngagementRecorded(_Body):
    ref: str
    event: str
    #: True the first time; False when this message's event was already recorded.
    recorded: bool


class SuppressionResult(_Body):
    channel: str
    added: Count | None = None
    removed: Count | None = None


class TriggeredAccepted(_Body):
    message_id: str
    campaign_id: str
    state: Literal["queued", "suppressed", "frequency_capped"] = Field(
        description="queued; or refused (no record): suppressed, frequency_capped"
    )
    not_before: float
    replayed: bool = Field(description="true when this answers a repeated Idempotency-Key")


class ProblemFieldError(_Body):
    field: str
    reason: str


class Problem(_Body):
    type: str
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    instance: str
    errors: list[ProblemFieldError] | None = None


class Health(_Body):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] | None = None


#: Every model the OpenAPI document publishes, by component name.
MODELS: Final[dict[str, type[BaseModel]]] = {
    model.__name__: model
    for model in (
        CampaignSpec,
        CampaignCreateJson,
        CampaignCreateFromSource,
        AudienceSourceRef,
        Prediction,
        PlanReport,
        CampaignStatus,
        CampaignPatch,
        RoundTotals,
        RoundReport,
        CampaignReport,
        MessageRecord,
        MessagePage,
        SuppressionAdd,
        SuppressionResult,
        PushOpen,
        EngagementRecorded,
        TriggeredMessage,
        TriggeredAccepted,
        ProblemFieldError,
        Problem,
        Health,
    )
}


def _components() -> dict[str, dict[str, Any]]:
    _, top = models_json_schema([(model, "validation") for model in MODELS.values()], ref_template=_REF_TEMPLATE)
    return dict(top.get("$defs", {}))


#: The OpenAPI components: JSON Schema 2020-12 generated from :data:`MODELS`.
SCHEMAS: Final[dict[str, dict[str, Any]]] = _components()


def parse(model: type[M], data: Any, prefix: str = "") -> M:
    """``data`` as ``model``; else an :class:`ApiProblem` 422 naming every bad field."""
    from dispatch.api.problems import ApiProblem

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [FieldError(field, reason) for field, reason in field_errors(exc, prefix)]
        raise ApiProblem(422, f"the {model.__name__} is invalid", errors=errors) from None


def errors_of(model: type[BaseModel], data: Any, prefix: str = "") -> list[FieldError]:
    """Every way ``data`` departs from ``model`` (empty when it conforms)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return [FieldError(field, reason) for field, reason in field_errors(exc, prefix)]
    return []
