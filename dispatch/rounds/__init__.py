"""Follow-up rounds: audiences derived from earlier campaigns' outcomes (:mod:`.derive`, the
``where`` language in :mod:`.where`), funnel files (:mod:`.funnel`), the scheduler that starts
each round exactly once (:mod:`.scheduler`) and the per-round reports (:mod:`.report`)."""
