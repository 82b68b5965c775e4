"""Worker process settings that only a real process shows."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from dispatch.config import Settings
from loadtest.cluster import LocalCluster


def _thread_nices_once_started(pid: int, timeout_s: float = 30.0) -> list[int]:
    """The niceness of every thread of a worker process, read once it runs its dramatiq threads
    (so a setting applied after the threads started would show on some of them)."""
    deadline = time.monotonic() + timeout_s
    tasks = Path(f"/proc/{pid}/task")
    while True:
        nices = []
        for task in tasks.iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            nices.append(int(fields[16]))  # field 19 of proc(5), counted from field 3
        if len(nices) >= 4 or time.monotonic() > deadline:
            return nices
        time.sleep(0.1)


def test_workers_run_at_the_configured_niceness(cluster_settings: Settings) -> None:
    with LocalCluster(replace(cluster_settings, worker_nice=7), workers=2) as cluster:
        per_worker = [_thread_nices_once_started(proc.pid) for proc in cluster.worker_processes]
    assert all(len(nices) >= 4 for nices in per_worker), per_worker
    assert {nice for nices in per_worker for nice in nices} == {7}


def test_workers_run_under_sched_idle_when_asked(cluster_settings: Settings) -> None:
    settings = replace(cluster_settings, worker_sched_idle=True)
    with LocalCluster(settings, workers=1) as cluster:
        pid = cluster.worker_processes[0].pid
        nices = _thread_nices_once_started(pid)
        policies = {os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()}
    assert len(nices) >= 4
    assert policies == {os.SCHED_IDLE}  # every thread, the ones dramatiq started included


def test_workers_keep_the_default_priority(cluster_settings: Settings) -> None:
    assert cluster_settings.worker_nice == 0
    with LocalCluster(cluster_settings, workers=1) as cluster:
        pid = cluster.worker_processes[0].pid
        nices = _thread_nices_once_started(pid)
        policies = {os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()}
    assert len(nices) >= 4
    assert set(nices) == {0}
    assert policies == {os.SCHED_OTHER}
