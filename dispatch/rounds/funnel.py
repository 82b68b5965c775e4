"""A funnel file: every round of a multi-round campaign, declared at once (TOML).

    id = "offer"

    [[rounds]]
    id = "offer-1"
    channel = "email"
    subject = "Our offer"
    body = "Hi $first_name, ..."
    audience = "customers.csv"          # round 1: an audience file (relative to the funnel file)

    [[rounds]]
    id = "offer-2"
    channel = "sms"
    body = "Did you see our offer?"
    audience = { from = "offer-1", where = "opened and not clicked", after = "72h", contacts = "customers.csv" }

Each round is a :class:`dispatch.campaign.CampaignSpec` (every field of a campaign file) whose
``audience`` is either a file path (planned and started as soon as the funnel is submitted) or a
:class:`dispatch.campaign.FollowUp` (derived and started by the scheduler,
:mod:`dispatch.rounds.scheduler`, once its source finished and ``after`` passed). A follow-up
must name a round declared before it, so a round derives only from a round of its own funnel
(there is no tenant model: the funnel is the unit one submitter owns, and a round id may belong
to one funnel only, :func:`register_funnel`). Registered funnels live in Redis (``keys.FUNNELS``) so any
process's scheduler sees them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import redis

from dispatch.campaign import CampaignSpec, FollowUp
from dispatch.errors import PlanError
from dispatch.store import keys

__all__ = ["Funnel", "Round", "load_funnel", "load_funnel_file", "register_funnel", "registered_funnels"]


@dataclass(frozen=True, slots=True)
class Round:
    spec: CampaignSpec
    #: The audience file of a first round (absolute), None for a follow-up.
    audience_path: str | None = None
    #: The derived audience of a follow-up round, None for a first round.
    follow: FollowUp | None = None


@dataclass(frozen=True, slots=True)
class Funnel:
    id: str
    rounds: tuple[Round, ...]

    def round(self, campaign_id: str) -> Round | None:
        return next((r for r in self.rounds if r.spec.id == campaign_id), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rounds": [
                {
                    "spec": r.spec.as_json(),
                    "audience_path": r.audience_path,
                    "follow": None if r.follow is None else r.follow.as_data(),
                }
                for r in self.rounds
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Funnel:
        rounds = tuple(
            Round(
                CampaignSpec.from_mapping(r["spec"]),
                r.get("audience_path"),
                None if r.get("follow") is None else FollowUp.from_mapping(r["follow"]),
            )
            for r in data["rounds"]
        )
        return cls(str(data["id"]), rounds)


def load_funnel(data: Any, *, base_dir: Path) -> Funnel:
    """A funnel from its parsed TOML; PlanError naming the round and field for each problem."""
    if not isinstance(data, dict):
        raise PlanError("funnel: expected a table at the top level")
    funnel_id = data.get("id")
    if not isinstance(funnel_id, str) or not funnel_id:
        raise PlanError('funnel: needs id = "..."')
    raw_rounds = data.get("rounds")
    if not isinstance(raw_rounds, list) or not raw_rounds:
        raise PlanError(f"funnel {funnel_id}: needs at least one [[rounds]] table")
    extra = sorted(set(data) - {"id", "rounds"})
    if extra:
        raise PlanError(f"funnel {funnel_id}: unknown key(s) {', '.join(extra)}")
    rounds: list[Round] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_rounds, start=1):
        where = f"funnel {funnel_id}, round {n}"
        if not isinstance(raw, dict):
            raise PlanError(f"{where}: expected a table")
        fields = dict(raw)
        audience = fields.pop("audience", None)
        path: str | None = None
        follow: FollowUp | None = None
        try:
            if isinstance(audience, str):
                path = str((base_dir / audience).resolve())
            elif isinstance(audience, dict):
                follow = FollowUp.from_mapping(audience)
            else:
                raise PlanError("audience must be a file path or { from = ..., where = ... }")
            spec = CampaignSpec.from_mapping(fields)
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None
        if spec.id in seen:
            raise PlanError(f"{where}: round id {spec.id!r} appears twice")
        if follow is not None:
            if follow.source not in seen:
                raise PlanError(f"{where}: audience.from {follow.source!r} is not a round declared before it")
            if follow.contacts is not None and not Path(follow.contacts).is_absolute():
                follow = FollowUp.from_mapping({**follow.as_data(), "contacts": str(base_dir / follow.contacts)})
        seen.add(spec.id)
        rounds.append(Round(spec, path, follow))
    if rounds[0].audience_path is None:
        raise PlanError(f"funnel {funnel_id}, round 1: the first round needs an audience file")
    return Funnel(funnel_id, tuple(rounds))


def load_funnel_file(path: Path) -> Funnel:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read funnel file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"funnel file {path}: not valid TOML: {exc}") from None
    return load_funnel(data, base_dir=path.parent.resolve())


def register_funnel(client: redis.Redis, funnel: Funnel) -> bool:
    """Store ``funnel`` for the schedulers (True); False when it is registered already with the
    same rounds. PlanError when that id is registered with other rounds, or a round id is another
    funnel's (rounds derive only from rounds of their own funnel)."""
    encoded = orjson.dumps(funnel.as_json())
    ours = {r.spec.id for r in funnel.rounds}
    for other in registered_funnels(client):
        taken = sorted(ours & {r.spec.id for r in other.rounds}) if other.id != funnel.id else []
        if taken:  # a round derives only from rounds of its own funnel, never from another's
            raise PlanError(f"funnel {funnel.id!r}: round id {taken[0]!r} belongs to funnel {other.id!r}")
    if client.hsetnx(keys.FUNNELS, funnel.id, encoded):
        return True
    stored = cast(bytes, client.hget(keys.FUNNELS, funnel.id))
    if stored != encoded:
        raise PlanError(f"funnel {funnel.id!r} is already registered with other rounds; use a new funnel id")
    return False


def registered_funnels(client: redis.Redis) -> list[Funnel]:
    raw = cast(dict[bytes, bytes], client.hgetall(keys.FUNNELS))
    return [Funnel.from_json(orjson.loads(value)) for _, value in sorted(raw.items())]


def find_funnel(client: redis.Redis, funnel_id: str) -> Funnel | None:
    raw = cast(bytes | None, client.hget(keys.FUNNELS, funnel_id))
    return None if raw is None else Funnel.from_json(orjson.loads(raw))
