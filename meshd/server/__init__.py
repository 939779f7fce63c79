"""The meshd control plane: certificate authority and HTTP API."""
