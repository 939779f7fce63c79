"""Test-suite wiring: each fixture family lives in its own plugin module."""

pytest_plugins = [
    "tests.plugins.consul_agent",
    "tests.plugins.pki",
    "tests.plugins.netns",
    "tests.plugins.mesh",
]
