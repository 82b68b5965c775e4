"""The README's "Your first campaign" walkthrough, run as written.

The shell blocks marked ``<!-- walkthrough -->`` are run in order by one ``bash -e`` in an empty
directory, against a fresh default ``DISPATCH_HOME`` (``XDG_DATA_HOME`` points into the test's
directory), the real embedded Valkey and the real mock provider; only the mock's port is changed
(8099 may be taken). Background processes the README starts (mock, worker) belong to the script's
process group, which the test ends whatever happens; the embedded server is stopped by its home.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from dispatch.store.embedded import find_embedded, stop_embedded

README = Path(__file__).parents[1] / "README.md"
#: The walkthrough's mock port, replaced by a free one.
README_PORT = "8099"
#: Generous: about a dozen CLI processes (each takes seconds to start on a busy 2-core machine),
#: a worker's start-up and its speed probe.
SCRIPT_TIMEOUT_S = 300
MARK = "<!-- walkthrough -->"


def walkthrough_blocks(text: str) -> list[str]:
    """The ```sh blocks of the "Your first campaign" section that follow the walkthrough mark."""
    section = text.split("## Your first campaign", 1)[1].split("\n## ", 1)[0]
    return re.findall(re.escape(MARK) + r"\n```sh\n(.*?)```", section, flags=re.DOTALL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_readme_marks_the_whole_walkthrough() -> None:
    text = README.read_text()
    section = text.split("## Your first campaign", 1)[1].split("\n## ", 1)[0]
    blocks = walkthrough_blocks(text)
    # every sh block of the section is marked, so none is left out of the run below
    assert len(blocks) == section.count("```sh") >= 6
    script = "\n".join(blocks)
    for command in ("mock-provider", "dispatch worker", "dispatch plan", "dispatch start", "dispatch status"):
        assert command in script
    assert "dispatch export" in script and "dispatch redis stop" in script and README_PORT in script


@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 60)
def test_first_campaign_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough_blocks(README.read_text())
    port = str(_free_port())
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "xdg-data"
    home = data / "dispatch"  # the default DISPATCH_HOME under that XDG_DATA_HOME
    campaign_dir = work / "first-campaign"
    stats_file = tmp_path / "mock-stats.json"
    # Before the last block (which stops the mock), record what the mock received.
    record = (
        f'"{sys.executable}" -c "import sys, urllib.request; '
        "open(sys.argv[2], 'wb').write(urllib.request.urlopen(sys.argv[1], timeout=10).read())\" "
        f'"http://127.0.0.1:{port}/_mock/stats" "{stats_file}"\n'
    )
    script = "set -e\n" + "".join(blocks[:-1]) + record + blocks[-1]
    script = script.replace(README_PORT, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    env.update(
        XDG_DATA_HOME=str(data),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the script and its background jobs: one process group
    )
    try:
        # returns once every process holding the script's stdout/stderr is gone: background jobs too
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
        left_behind = _group_alive(proc.pid)
        valkey_left = find_embedded(home) is not None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the walkthrough did not finish in {SCRIPT_TIMEOUT_S} s\n{out}\n{err}\n{_logs(campaign_dir)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a background job the script left behind
        if home.exists():
            stop_embedded(home)
    assert proc.returncode == 0, f"the walkthrough failed\n{out}\n{err}\n{_logs(campaign_dir)}"

    # the plan: 6 rows, 3 accepted, one of each rejection the README names
    assert re.search(r"rows\s+6\b", out) and re.search(r"accepted\s+3\b", out), out
    for reason in ("no_consent", "invalid_phone", "duplicate"):
        assert re.search(rf"\b{reason}\s+1\b", out), (reason, out)
    # every accepted recipient sent exactly once: the export, and the provider's own ledger
    with (campaign_dir / "outcomes.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["recipient_id"] for r in rows) == ["1", "2", "3"]
    assert {r["state"] for r in rows} == {"sent"} and len({r["provider_id"] for r in rows}) == 3
    stats = orjson.loads(stats_file.read_bytes())
    assert stats["accepted"] == 3 and stats["duplicates"] == 0 and stats["replays"] == 0
    # the first command that needed Valkey said it started it, where, and how to stop it; no
    # later process (worker, plan) started another: they all found it through the default home
    notices = [line for line in err.splitlines() if "started an embedded Valkey server" in line]
    assert len(notices) == 1 and str(home) in notices[0] and "dispatch redis stop" in notices[0], err
    assert f"DISPATCH_HOME={home}" in out  # `dispatch redis status` names the home it uses
    # the last block stopped everything: no process of the script is left, Valkey is down
    assert not left_behind and not valkey_left


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _logs(campaign_dir: Path) -> str:
    parts = []
    for name in ("mock.log", "worker.log"):
        path = campaign_dir / name
        if path.exists():
            parts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)
