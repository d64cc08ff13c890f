"""Retry policy for idempotent upstream requests (tenacity), from config.

Retried: connection errors, timeouts and 5xx (all raised as
UpstreamUnavailable). Never retried: 4xx, which will not change by asking
again, and 429, which asks us to wait far longer than a backoff.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_none,
    wait_random,
)
from tenacity.wait import wait_base

from mirror.errors import UpstreamUnavailable
from mirror.metrics import RegistryMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    backoff: float  # first wait, seconds; 0 retries at once (tests)
    max_time: float

    def wait(self) -> wait_base:
        if self.backoff <= 0:
            return wait_none()
        # backoff, 2x, 4x, ... capped at 16x, plus up to one backoff of jitter
        # so that clients failing together do not retry together.
        return wait_exponential(
            multiplier=self.backoff, max=self.backoff * 16
        ) + wait_random(0, self.backoff)

    def retrying(self, kind: str, metrics: RegistryMetrics) -> AsyncRetrying:
        def before_sleep(state: RetryCallState) -> None:
            metrics.retries.labels(kind).inc()
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            log.info(
                "%s %s request failed (%s); attempt %d of %d",
                metrics.registry,
                kind,
                error,
                state.attempt_number,
                self.attempts,
            )

        return AsyncRetrying(
            stop=stop_after_attempt(max(1, self.attempts))
            | stop_after_delay(self.max_time),
            wait=self.wait(),
            retry=retry_if_exception_type(UpstreamUnavailable),
            before_sleep=before_sleep,
            reraise=True,
        )
