"""Integration tests: the mirror between a real registry and real clients."""
