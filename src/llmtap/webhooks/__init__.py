"""Webhooks: endpoints, the outbox written with the records, and the deliverer that sends it."""
