"""BentoML service, input validation, drift monitor and Prometheus metrics. Never imports torch."""
