"""Planning: read an audience, check every row, freeze the snapshot, predict the send.

Holds the audience readers (``audience``, ``sources``, the fast CSV scan ``csv_scan``), dedup,
the planner, the snapshot it writes to Redis, and the prediction with its machine-speed
calibration. May import ``dispatch.rules``, ``dispatch.store``, ``dispatch.campaign``,
``dispatch.config``, ``dispatch.errors``; never ``dispatch.send``, ``dispatch.api``,
``dispatch.triggered`` or ``dispatch.cli``.
"""
