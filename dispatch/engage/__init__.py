"""Engagement: what recipients did with a message after it was sent (opens, clicks, replies,
opt-outs), recorded per message in an idempotent ledger (:mod:`dispatch.engage.ledger`)."""
