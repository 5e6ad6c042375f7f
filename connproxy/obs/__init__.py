"""Observability shared by both roles: logging set-up and the audit stream."""
