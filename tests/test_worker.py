"""Worker process settings that only a real process shows."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from dispatch.config import Settings
from loadtest.cluster import LocalCluster


def test_workers_run_at_the_configured_niceness(cluster_settings: Settings) -> None:
    with LocalCluster(replace(cluster_settings, worker_nice=7), workers=2) as cluster:
        pids = [proc.pid for proc in cluster.worker_processes]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [7, 7]:
                break
            time.sleep(0.1)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [7, 7]


def test_workers_keep_the_normal_policy_by_default(cluster_settings: Settings) -> None:
    assert cluster_settings.worker_nice == 0
    with LocalCluster(cluster_settings, workers=1) as cluster:
        pid = cluster.worker_processes[0].pid
        time.sleep(1.0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
