"""The operator's overview: counts, throughput, processing times, queues, errors, workers."""
