"""`GET /metrics`: the Prometheus scrape (counts from every process, gauges read when scraped)."""
