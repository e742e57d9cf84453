"""Paused queues in the worker: a worker consumes none of its queues that are paused."""
