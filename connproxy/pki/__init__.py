"""Certificates, TLS contexts, development tokens and the development state folder."""
