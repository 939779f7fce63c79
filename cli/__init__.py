"""meshctl: the operator CLI."""
