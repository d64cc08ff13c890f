"""Run a real Prometheus (Debian's ``prometheus``) scraping test targets.

This module owns ``PrometheusProcess``: it writes a configuration scraping
the given targets as job ``mirror`` every second (the job name the shipped
alert rules select), loading the given rule files, starts
``prometheus`` on a free loopback port with its TSDB in the work directory,
waits for ``/-/ready``, and stops it by PID. ``query`` and ``rules`` read
its HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from .tools import ManagedProcess, ProcessDied, free_port, http_status

SCRAPE_INTERVAL = 1.0


class QueryFailed(AssertionError):
    """Prometheus refused a query (a parse or evaluation error)."""


@dataclass
class PrometheusProcess:
    binary: str
    workdir: Path
    targets: Sequence[str]
    rule_files: Sequence[Path] = ()
    port: int = 0
    process: ManagedProcess | None = None
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config_path = self.workdir / "prometheus.yml"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        interval = f"{SCRAPE_INTERVAL:g}s"
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": "mirror",
                    "static_configs": [{"targets": list(self.targets)}],
                }
            ],
        }

    def start(self, *, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start Prometheus and wait for /-/ready; retries on a fresh port if
        it dies (a port taken meanwhile). Raises ProcessDied or TimeoutError
        with its log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        for attempt in range(attempts):
            self.port = free_port()
            self.process = ManagedProcess(
                name="prometheus",
                argv=[
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / f'data{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                log_path=self.workdir / "prometheus.log",
            )
            self.process.start()
            try:
                self.process.wait_ready(
                    lambda: http_status(f"{self.url}/-/ready") == 200,
                    timeout=timeout,
                    what="/-/ready answering 200",
                )
                return
            except ProcessDied:
                if attempt == attempts - 1:
                    raise

    def stop(self) -> int | None:
        return None if self.process is None else self.process.stop()

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its `data`. Raises QueryFailed with
        Prometheus' error when the status is not success."""
        async with http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise QueryFailed(f"{path} {params}: {body.get('error', body)}")
        return body["data"]

    async def query(self, http: aiohttp.ClientSession, expr: str) -> list[Any]:
        """An instant query's result: a list of series (a scalar as one)."""
        data = await self.api(http, "query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[Any] = data["result"]
        return result

    async def rules(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        data = await self.api(http, "rules")
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def scraped_after(
        self, http: aiohttp.ClientSession, moment: float, *, within: float = 30.0
    ) -> None:
        """Wait until a scrape that started after `moment` (a time.time())
        is stored, and the rules were evaluated after it."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            samples = await self.query(http, 'timestamp(up{job="mirror"})')
            rules = await self.rules(http)
            scraped = (
                bool(samples) and min(float(s["value"][1]) for s in samples) > moment
            )
            evaluated = all(
                _rfc3339_after(rule.get("lastEvaluation", ""), moment + SCRAPE_INTERVAL)
                for rule in rules
            )
            if scraped and evaluated:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(
            f"Prometheus stored no scrape after {moment} within {within}s; log:\n"
            f"{'' if self.process is None else self.process.log_text()}"
        )


def _rfc3339_after(stamp: str, moment: float) -> bool:
    """Whether an RFC 3339 time from Prometheus' API is after `moment`
    (Go's zero time, for never, is not)."""
    if not stamp or stamp.startswith("0001-"):
        return False
    # Prometheus writes nanoseconds; fromisoformat takes microseconds.
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))
    return datetime.fromisoformat(stamp).timestamp() > moment
