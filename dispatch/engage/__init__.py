"""Engagement: what recipients did with a message after it was sent (opens, clicks, replies,
opt-outs), recorded per message in an idempotent ledger (:mod:`dispatch.engage.ledger`).

- :mod:`dispatch.engage.links`: ``$link(URL)`` tracked links (plan-time check, per-message
  signed ``/r/<token>`` URLs, the redirect endpoint and its click recorder);
- :mod:`dispatch.engage.replies`: opt-out keywords and the number -> last message index;
- :mod:`dispatch.engage.apply`: verified provider events (``channels.receipts``) into the ledger
  and the suppression list;
- :mod:`dispatch.engage.service`: those pieces built once from settings for a receiving process.
"""
