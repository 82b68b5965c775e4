"""Triggered (transactional) messages: accepted one by one, sealed into micro-batches of a
per-hour triggered campaign that the workers send like any other. May import ``dispatch.rules``,
``dispatch.store``, ``dispatch.send``, ``dispatch.plan`` (the manifest), ``dispatch.config`` and
``dispatch.api.problems`` / ``dispatch.api.pipelined`` (the API's error type and connection);
never ``dispatch.cli``.
"""
