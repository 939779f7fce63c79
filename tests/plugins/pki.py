"""Fixtures: pki (being written)."""
