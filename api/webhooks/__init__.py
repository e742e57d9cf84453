"""Webhooks: project endpoints, their secrets, the delivery log and redelivery."""
