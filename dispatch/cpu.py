"""CPU scheduling requests of our processes: sharing cores between latency- and throughput-bound work.

The API answers in a millisecond; workers and the planner crunch for as long as they are let. On a
machine they share, two unprivileged Linux knobs keep the API's latency:

- workers raise their niceness (``worker_nice``), so they get a smaller share when both want a core;
- the API asks for a short time slice (``api_cpu_slice_us``). Since Linux 6.6 the fair scheduler is
  EEVDF, and since 6.12 a task may ask for its own slice (``sched_setattr``'s ``sched_runtime``,
  clamped by the kernel to 0.1-100 ms, no privilege needed): a waking task with a shorter slice than
  the running one preempts it at once instead of waiting for the running one's slice to end (up to
  a 4 ms tick on a HZ=250 kernel). Older kernels and other systems ignore or refuse the request;
  that costs latency, never correctness.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import struct

log = logging.getLogger(__name__)

#: ``sched_setattr`` / ``sched_getattr`` system call numbers by machine (no libc wrapper before glibc 2.41)
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
#: struct sched_attr, version 1 (56 bytes): size, policy, flags, nice, priority, runtime, deadline,
#: period, util_min, util_max
_ATTR = struct.Struct("IIQiIQQQII")
_SCHED_OTHER = 0


def yield_cpu(nice: int) -> None:
    """Throughput-bound: leave the CPU to latency-bound neighbours (the API) when they need it.

    Set before any thread starts: Linux applies niceness per thread and new threads inherit it.
    (SCHED_BATCH as well was measured worse: API p99 beside a campaign 22-37 ms against 11-12 ms
    with the niceness alone.)
    """
    if nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def request_slice(slice_us: int) -> bool:
    """Ask the scheduler for a ``slice_us`` time slice for the calling thread (and the threads it
    starts later). False, with the reason logged, where the system does not take the request."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or not hasattr(os, "getpriority"):
        log.info("CPU slice request skipped: no sched_setattr on %s", platform.machine() or "this system")
        return False
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    attr = ctypes.create_string_buffer(_ATTR.pack(_ATTR.size, _SCHED_OTHER, 0, nice, 0, slice_us * 1000, 0, 0, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[0], 0, attr, 0) != 0:
        errno = ctypes.get_errno()
        log.info("CPU slice request refused by the kernel: %s", os.strerror(errno))
        return False
    return True


def current_slice_us() -> int | None:
    """The calling thread's requested slice (µs, as the kernel clamped it), None where unknown."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return None
    attr = ctypes.create_string_buffer(_ATTR.size)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(numbers[1], 0, attr, _ATTR.size, 0) != 0:
        return None
    runtime_ns: int = _ATTR.unpack(attr.raw)[5]
    return runtime_ns // 1000
