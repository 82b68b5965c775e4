"""The crash drill in the suite (``dispatch chaos``, smaller): against a Twilio twin that ignores
idempotency keys, a worker SIGKILL, a Valkey SIGKILL with the last second of its AOF cut and a
provider outage; every recipient compared with the provider's own journaled ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatch.config import load_settings
from loadtest.chaos import ChaosOptions, run_chaos


@pytest.mark.timeout(480)  # a minute on an idle machine; processes restarted, a broker that cannot drain
def test_crash_drill_every_recipient_exactly_once(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_HOME": str(tmp_path / "home")})
    options = ChaosOptions(
        recipients=2_000, workers=2, rate=150.0, worker_kills=1, outage_s=3.0, timeout_s=240.0, seed=5
    )
    report = run_chaos(settings, options, say=lambda _: None)
    events = [e["event"] for e in report.events]
    assert {"worker-kill", "valkey-kill", "outage"} <= set(events), report.events
    assert any(e.get("aof_bytes_cut", 0) > 0 for e in report.events), "the AOF cut lost nothing: it proves less"
    assert report.completed, report.as_dict()
    assert report.duplicates == 0 and report.missing == 0 and report.phantom == 0, report.as_dict()
    assert report.sent + report.failed == report.accepted
    assert report.provider_accepted == report.sent  # nothing recorded sent that the provider lacks
