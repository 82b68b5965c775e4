"""CPU scheduling requests: the API's short EEVDF slice, the workers' niceness.

The slice is read back two ways: ``sched_getattr`` (what ``current_slice_us`` asks) and the
kernel's own ``/proc/<pid>/task/<tid>/sched`` (``se.slice``), so a wrong struct layout cannot pass
by reading back its own mistake.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from dispatch.config import load_settings
from dispatch.cpu import current_slice_us, request_slice, yield_cpu
from loadtest.cluster import settings_env
from loadtest.runner import free_port

T = TypeVar("T")
_KERNEL = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
needs_custom_slices = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64") or _KERNEL < (6, 12),
    reason="per-task slices need Linux 6.12+ on x86_64 or aarch64",
)


def proc_slice_us(pid: int, tid: int) -> int:
    text = Path(f"/proc/{pid}/task/{tid}/sched").read_text()
    match = re.search(r"se\.slice\s*:\s*(\d+)", text)
    assert match, "the kernel's sched file has no se.slice"
    return int(match.group(1)) // 1000


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread (slices and niceness are per thread: keep pytest's own clean)."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


@needs_custom_slices
def test_request_slice_sets_the_calling_threads_slice_and_threads_it_starts_inherit_it() -> None:
    def body() -> tuple[bool, int | None, int, int]:
        ok = request_slice(300)
        child: list[int] = []
        worker = threading.Thread(target=lambda: child.append(proc_slice_us(os.getpid(), threading.get_native_id())))
        worker.start()
        worker.join()
        return ok, current_slice_us(), proc_slice_us(os.getpid(), threading.get_native_id()), child[0]

    ok, read_back, from_proc, inherited = in_thread(body)
    assert ok is True
    assert read_back == 300
    assert from_proc == 300
    assert inherited == 300
    assert proc_slice_us(os.getpid(), threading.get_native_id()) != 300  # this thread untouched


@needs_custom_slices
def test_request_slice_keeps_the_threads_niceness() -> None:
    def body() -> tuple[int, int]:
        yield_cpu(5)
        request_slice(200)
        return os.getpriority(os.PRIO_PROCESS, 0), proc_slice_us(os.getpid(), threading.get_native_id())

    nice, slice_us = in_thread(body)
    assert nice == 5
    assert slice_us == 200


@needs_custom_slices
def test_the_kernel_clamps_a_slice_below_100_us() -> None:
    assert in_thread(lambda: (request_slice(1), current_slice_us())) == (True, 100)


@needs_custom_slices
def test_dispatch_serve_runs_its_event_loop_on_the_configured_slice(redis_url: str, tmp_path: Path) -> None:
    settings = load_settings(
        {"DISPATCH_HOME": str(tmp_path), "DISPATCH_REDIS_URL": redis_url, "DISPATCH_API_CPU_SLICE_US": "250"}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")} | settings_env(settings)
    port = free_port()
    proc = subprocess.Popen(  # our own command
        [sys.executable, "-m", "dispatch.cli", "serve", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "dispatch serve exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "dispatch serve did not answer /healthz"
                time.sleep(0.1)
        assert proc_slice_us(proc.pid, proc.pid) == 250  # the main thread runs the event loop
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
