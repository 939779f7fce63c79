"""meshd-agent: the per-host registrar, interceptor and proxy."""
