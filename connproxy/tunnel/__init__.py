"""Twisted glue for the tunnel protocol: connections, streams as transports, the registry and the endpoint."""
