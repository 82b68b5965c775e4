"""Exceptions raised by the ``dispatch`` package.

The tree::

    DispatchError
    ├── ConfigError            a setting is missing or invalid (names the setting and the fix)
    ├── RedisSetupError        the Redis/Valkey server cannot be used as configured
    │   └── EvictionPolicyError  the server may evict keys (maxmemory-policy is not noeviction)
    ├── AudienceError          the audience source cannot be read at all (per-row problems are
    │   │                      rejections, never exceptions)
    │   └── SourceUnavailable  (dispatch.plan.sources) a configured source's database cannot be reached
    ├── PlanError              a campaign cannot be planned (stale source, bad template, ...)
    │   ├── WhereError         (dispatch.rounds.where) a follow-up's ``where`` does not parse
    │   └── EmptyRound         (dispatch.rounds.derive) nobody qualifies for a follow-up round
    ├── CampaignNotFound       no campaign with that id
    ├── CampaignStateError     the operation does not fit the campaign's state
    ├── ApiProblem             (dispatch.api.problems) an API request is refused: RFC 9457 problem
    ├── ApiError               (dispatch.api.client) the API answered a problem to the Python client
    └── ApiUnreachable         (dispatch.api.client) the API cannot be reached, or is not the API
"""

from __future__ import annotations

__all__ = [
    "AudienceError",
    "CampaignNotFound",
    "CampaignStateError",
    "ConfigError",
    "DispatchError",
    "EvictionPolicyError",
    "PlanError",
    "RedisSetupError",
]


class DispatchError(Exception):
    """Root of every error raised by ``dispatch``."""


class ConfigError(DispatchError):
    """A setting is missing or invalid; the message names the setting and how to fix it."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(f"{setting}: {problem}. Fix: {fix}")


class RedisSetupError(DispatchError):
    """The Redis/Valkey server cannot be used as configured."""


class EvictionPolicyError(RedisSetupError):
    """The server would evict keys, which silently loses dedup claims and snapshots."""


class AudienceError(DispatchError):
    """The audience source as a whole cannot be read (missing file, unknown format)."""


class PlanError(DispatchError):
    """The campaign cannot be planned; the message says why and what to change."""


class CampaignNotFound(DispatchError):
    """No campaign with this id exists."""


class CampaignStateError(DispatchError):
    """The requested operation does not fit the campaign's current state."""
