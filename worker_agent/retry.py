"""Retry forever with exponential backoff and jitter (tenacity), logging why each try failed."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

log = structlog.get_logger("worker_agent.retry")

T = TypeVar("T")


async def retry_forever(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    initial: float,
    maximum: float,
    retry_on: tuple[type[BaseException], ...],
) -> T:
    """Await ``attempt()`` until it succeeds; waits ``initial`` → ``maximum`` s between tries.

    Only the exception types in ``retry_on`` are retried; anything else propagates (so does
    cancellation).
    """

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            f"{what}_retry",
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2),
            error=str(exc) if exc else None,
            error_type=type(exc).__name__ if exc else None,
        )

    backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)

    def wait(state: RetryCallState) -> float:
        # The other side's Retry-After (a shedding coordinator's 503) is a floor on the backoff,
        # spread over [asked, 1.5 * asked] so that a shed crowd does not come back all at once.
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        delay = backoff(state)
        if isinstance(asked, int | float) and asked > 0:
            delay = max(delay, float(asked) * (1.0 + random.random() / 2))  # noqa: S311
        return delay

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    )
    async for try_ in retrying:
        with try_:
            return await attempt()
    raise AssertionError("unreachable")  # pragma: no cover - tenacity never stops here
