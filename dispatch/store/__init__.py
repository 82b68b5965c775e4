"""Redis/Valkey: key names (``keys``), connecting and checking a server (``connect``), and the
embedded server a deployment starts when none is configured (``embedded``). May import
``dispatch.config``, ``dispatch.credentials`` and ``dispatch.errors``; nothing else of ``dispatch``.
"""
