"""Who may receive what: address validation (``validation``, ``phones``), freshness, consent
and quiet hours (``checks``), suppression lists and frequency caps. Used by planning, sending and
triggered messages alike. May import ``dispatch.config``, ``dispatch.credentials``,
``dispatch.errors`` and ``dispatch.store``; nothing else of ``dispatch``.
"""
