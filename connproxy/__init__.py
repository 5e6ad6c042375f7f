"""connproxy: a connectivity proxy for Kubernetes with reverse tunnels from on-premise connectors."""

__version__ = "0.1.0"
