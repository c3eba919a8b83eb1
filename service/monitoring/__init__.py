"""Prometheus metrics (every one in metrics.py), and the reward drift and hacking monitors."""
