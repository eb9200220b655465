"""Monitoring files for the service: Grafana dashboard, Prometheus scrape config and alert rules (see generate.py)."""
