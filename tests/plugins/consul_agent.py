"""Fixtures: consul_agent (being written)."""
