"""Fixtures: netns (being written)."""
