"""Talking to the Hub over a network that fails: which failures a retry can help, retrying those with
back-off, bounded waits, and one line that says what failed.

Every path that talks to the Hub (a source's download, the watch's listing, publishing) goes through
`retrying`, so they share one idea of "transient": no answer at all (refused, DNS, reset, timeout) or an
answer that says "later" (5xx, 429). Anything else (401, 404, a bad request) is the caller's to explain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")

# The names httpx (huggingface_hub 2.x: httpx2), hf_xet and urllib3 give the failures of a connection.
_TRANSPORT = {"RemoteProtocolError", "ConnectError", "ReadError", "WriteError", "ReadTimeout", "WriteTimeout",
              "ConnectTimeout", "PoolTimeout", "NetworkError", "TransportError", "TimeoutException"}


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def offline_mode() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def backoff_s() -> float:
    """Seconds before the first retry; each next wait doubles (QUANTKIT_RETRY_BACKOFF_S, default 2)."""
    return float(os.environ.get("QUANTKIT_RETRY_BACKOFF_S", 2.0))


def timeout_s() -> float:
    """How long one Hub request may wait for an answer (QUANTKIT_HUB_TIMEOUT_S, default 60): without a bound,
    a Hub that accepts a connection and never answers would hang a build, or a watch, forever."""
    return float(os.environ.get("QUANTKIT_HUB_TIMEOUT_S", 60.0))


def bound_requests() -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default is none). Requests that set their own
    (file downloads: HF_HUB_DOWNLOAD_TIMEOUT) keep theirs. Set again before every attempt: huggingface_hub
    replaces its client after a refused connection."""
    import httpx2
    from huggingface_hub import get_session

    limit = timeout_s()
    get_session().timeout = httpx2.Timeout(limit, connect=min(10.0, limit))


@contextlib.contextmanager
def quiet_client() -> Iterator[None]:
    """Without huggingface_hub's warnings (one per retry of its own), for output that must stay one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _chain(e: BaseException):
    """The exception and what it was raised from: huggingface_hub wraps a refused connection in its own errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_transient(e: BaseException) -> bool:
    """A failure that the same request may not meet a little later."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    for err in _chain(e):
        if isinstance(err, OfflineModeIsEnabled):  # a ConnectionError, but the user's choice: never retried
            return False
        if isinstance(err, HfHubHTTPError):
            status = getattr(err.response, "status_code", None)
            if status is not None:
                return status >= 500 or status in (408, 429)
        if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in _TRANSPORT:
            return True
    return False


def short(e: BaseException) -> str:
    """One line for a failure: the connection's error with its type, or the Hub's status and message."""
    from huggingface_hub.errors import HfHubHTTPError

    for err in _chain(e):
        if type(err).__name__ in _TRANSPORT or isinstance(err, (ConnectionError, TimeoutError)):
            text = (str(err).splitlines() or [""])[0][:200]
            return f"{type(err).__name__}: {text}" if text else type(err).__name__
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            said = (err.server_message or "").strip().splitlines()
            return f"HTTP {err.response.status_code} {err.response.reason_phrase}" + (f": {said[0][:200]}" if said else "")
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def outage(e: BaseException) -> str:
    """What a transient failure says of the Hub, in words: "the Hub at URL cannot be reached (ConnectError: ...)"."""
    from huggingface_hub.errors import HfHubHTTPError

    last, tries = (e.last, f" after {e.attempts} attempts") if isinstance(e, GaveUp) else (e, "")
    answered = any(isinstance(err, HfHubHTTPError) for err in _chain(last))
    return f"the Hub at {endpoint()} {'is failing' if answered else 'cannot be reached'} ({short(last)}{tries})"


class GaveUp(Exception):
    """Every attempt met a transient failure; `last` is the final one."""

    def __init__(self, last: BaseException, attempts: int) -> None:
        super().__init__(f"{short(last)} (after {attempts} attempts)")
        self.last, self.attempts = last, attempts


def retrying(fn: Callable[[], T], *, what: str, attempts: int = 5, backoff: float | None = None,
             log: Callable[[str], None] | None = None) -> T:
    """Call `fn` until it succeeds; transient failures are retried after 1, 2, 4, ... x `backoff` seconds and end in
    GaveUp after `attempts`. Anything else is raised at once, as it is. `log` hears of each retry."""
    wait = backoff_s() if backoff is None else backoff
    for i in range(attempts):
        try:
            bound_requests()
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            if i == attempts - 1:
                raise GaveUp(e, attempts) from e
            if log:
                log(f"{what}: {short(e)}; retrying in {wait * 2 ** i:.1f}s ({i + 1}/{attempts - 1})")
            time.sleep(wait * 2 ** i)
    raise AssertionError("unreachable")
