"""Sending: dramatiq workers, the engine that sends a batch, message tracking and control.

Holds the broker, the worker process (``worker``, ``runtime``), the engine, per-message tracking
with its Lua scripts, delivery receipts, and campaign control (start, pause, rate). May import
``dispatch.plan`` (the snapshot and calibration it reads), ``dispatch.rules``, ``dispatch.store``,
``channels``, ``ratelimit``, ``monitoring``; never ``dispatch.api``, ``dispatch.triggered`` or
``dispatch.cli``.
"""
