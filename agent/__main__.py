"""``python -m agent``: the same command line as ``meshd-agent`` (how workers are started)."""

from agent.main import main

main()
