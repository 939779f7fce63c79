"""The root of every exception meshd raises on purpose.

Each boundary (config files, Consul, the CA, peers) has its own family below
:class:`MeshdError`. Entry points catch :class:`MeshdError` and print its message as one
line; anything else is a bug and may show a traceback.
"""


class MeshdError(Exception):
    """Base class for errors whose message is fit to show an operator as-is."""
