"""The docs name every configuration key and metric the code defines."""

from __future__ import annotations

from pathlib import Path

from mirror.config import describe
from mirror.metrics import Metrics

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_config_key_and_variable_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for key, variable, _default, _doc in describe():
        assert f"`{key}`" in text, key
        assert f"`{variable}`" in text, variable


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text()
    for metric in Metrics().registry.collect():
        name = metric.name
        if metric.type == "counter":
            name += "_total"
        assert f"`{name}`" in text, name
