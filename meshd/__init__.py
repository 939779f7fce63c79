"""meshd: a service mesh for VMs and bare metal, backed by HashiCorp Consul, on trio.

The ``meshd`` package is the shared core: configuration, the Consul seam, identity, PKI,
intentions and policy, snapshots, the redirect rule builder and telemetry primitives.
The control plane lives in :mod:`meshd.server`; the per-host agent in :mod:`agent`; the
operator CLI in :mod:`cli`. The core never imports those three.
"""

__version__ = "0.1.0"
