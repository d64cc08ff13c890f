"""Talking to the upstream registry: HTTP client (client.py), auth (auth.py)."""
