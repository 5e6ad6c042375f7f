"""Integration tests run on the real reactor through pytest-twisted."""
