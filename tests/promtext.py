"""Reading a /metrics page in tests: one parser instead of one per file."""

from __future__ import annotations


def parse_samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition: `name{labels}` -> value,
    the name and labels exactly as the page writes them."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found
