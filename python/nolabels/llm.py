"""One client for OpenAI-compatible chat endpoints (``POST {base_url}/chat/completions``).

CODER's knowledge generator (:class:`nolabels.methods.coder.KnowledgeGenerator`) and
LatteCLIP's captioner (:class:`nolabels.methods.latteclip.VisionChatClient`) both talk to
their model through :class:`ChatClient`. It is built on httpx (HTTP, timeouts) and tenacity
(bounded retries), the optional extra ``nolabels[llm]``.

Retries: network errors, timeouts, HTTP 408, 429 and 5xx are retried, at most
``max_attempts`` attempts in all, waiting ``backoff · 2^(n-1)`` seconds (capped at
``max_backoff``) after the n-th failure; a ``Retry-After`` header (delta-seconds or an
HTTP-date) on such an answer is honoured instead, up to ``max_retry_after`` seconds (a
longer wait is not attempted: the error names it). Any other HTTP error (400, 401, 404...)
fails at once. Every failure is one line: :class:`LLMError`.

The API key is read from the environment only, from the variable named by ``api_key_env``
(default ``OPENAI_API_KEY``; unset or empty: no ``Authorization`` header), and sent as a
Bearer token (it wins over credentials in the base URL, which are otherwise sent as Basic
auth). It is never printed: error messages, ``repr`` and log records (``nolabels.llm``, and
httpx's own request log) show the endpoint with the key, a password embedded in the base
URL (``https://user:KEY@host/v1``) and secret query values (``?api_key=KEY``) replaced by
``***``.
"""
from __future__ import annotations

import base64
import email.utils
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from nolabels.errors import MissingDependencyError, UnavailableError

#: The environment variable the key is read from unless another is named.
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
#: HTTP statuses that are retried (the request may succeed later).
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Query parameters whose values are treated as secrets in messages.
SECRET_QUERY_KEYS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token",
                               "auth", "password", "secret", "sig", "signature", "code"})
REDACTED = "***"

log = logging.getLogger("nolabels.llm")


class LLMError(UnavailableError):
    """The chat endpoint gave no usable answer (one line, secrets redacted)."""


def _deps() -> tuple[Any, Any]:
    try:
        import httpx
        import tenacity
    except ImportError as e:
        raise MissingDependencyError(
            f"the LLM client needs httpx and tenacity ({e.name} is missing): "
            "pip install 'nolabels[llm]'") from None
    return httpx, tenacity


# --------------------------------------------------------------------------- redaction
def url_secrets(url: str) -> list[str]:
    """The secret parts of ``url``: the userinfo password (or a lone userinfo token) and
    the values of :data:`SECRET_QUERY_KEYS` query parameters."""
    out: list[str] = []
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return out
    if parts.password:
        out.append(parts.password)
        user = urllib.parse.unquote(parts.username or "")
        pw = urllib.parse.unquote(parts.password)
        out.append(base64.b64encode(f"{user}:{pw}".encode()).decode())  # as Basic auth sends it
    elif parts.username and "@" in parts.netloc:
        out.append(parts.username)  # https://KEY@host: the token is the user name
    for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=False):
        if k.lower() in SECRET_QUERY_KEYS and v:
            out.append(v)
    return out


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (and its URL-quoted form) replaced by ``***``.

    Args:
        text: any message.
        secrets: strings to hide; None and strings shorter than 4 characters are ignored
            (replacing "a" everywhere would make a message unreadable and hides nothing).
    """
    for s in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        for form in {s, urllib.parse.quote(s, safe=""), urllib.parse.quote_plus(s)}:
            text = text.replace(form, REDACTED)
    return text


class _RedactFilter(logging.Filter):
    """Hides the secrets of every client built in this process in the records of httpx's
    loggers (httpx logs each request's URL, which may carry a key, at INFO)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            hidden = redact(msg, self.secrets)
            if hidden != msg:
                record.msg, record.args = hidden, ()
        return True


_FILTER = _RedactFilter()


def _guard_library_logs(secrets: Iterable[str | None]) -> None:
    _FILTER.secrets.update(s for s in secrets if s and len(s) >= 4)
    for name in ("httpx", "httpcore"):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


def _one_line(text: str, limit: int = 200) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- Retry-After
def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (``"7"``) or an
    HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``; a date in the past gives 0).
    None if absent or unreadable. ``now``: POSIX time (default: the clock)."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        secs = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        now_dt = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
        secs = (when - now_dt).total_seconds()
    if secs != secs or secs in (float("inf"), float("-inf")):  # nan / inf
        return None
    return max(0.0, secs)


class _Retryable(Exception):
    """One failed attempt that may succeed later (internal: carries the wait asked for)."""

    def __init__(self, why: str, retry_after: float | None = None) -> None:
        super().__init__(why)
        self.why, self.retry_after = why, retry_after


class _Fatal(Exception):
    """A failure that is not retried (internal)."""


# --------------------------------------------------------------------------- client
class ChatClient:
    """An OpenAI-compatible chat client with bounded retries and no secret in any message.

    Args:
        base_url: e.g. ``https://api.openai.com/v1``; ``/chat/completions`` is appended to
            its path (a query string is kept).
        model: the model name sent with each request.
        api_key_env: the environment variable holding the API key (read once, here), sent
            as ``Authorization: Bearer``; None or an unset variable: no header.
        max_attempts: attempts per request in all (>= 1).
        backoff: seconds after the first failure; doubled after each further one.
        max_backoff: cap on one exponential wait.
        max_retry_after: the longest ``Retry-After`` honoured; a server asking for more
            ends the retries with an :class:`LLMError` naming the wait.
        timeout: seconds for connecting, and for each read/write of the request.
        sleep: how to wait (tests pass a recorder).
        transport: an httpx transport (tests); default: the network.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = DEFAULT_API_KEY_ENV,
                 max_attempts: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_retry_after: float = 300.0, timeout: float = 120.0,
                 sleep: Callable[[float], None] | None = None, transport: Any = None) -> None:
        httpx, _ = _deps()
        if not base_url:
            raise LLMError("chat endpoint: base_url is required")
        if not model:
            raise LLMError("chat endpoint: model is required")
        self.model = model
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._key = key or None
        self._secrets = [self._key, *url_secrets(base_url)]
        _guard_library_logs(self._secrets)
        try:
            url = httpx.URL(base_url)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("not an http(s) URL")
        except (ValueError, TypeError, httpx.InvalidURL) as e:
            raise LLMError(f"chat endpoint {self._hide(base_url)!r}: bad base URL "
                           f"({self._hide(str(e))})") from None
        self._url = url.copy_with(path=url.path.rstrip("/") + "/chat/completions")
        #: the endpoint as it may be shown (secrets replaced by ``***``)
        self.url = self._hide(str(self._url))
        self.max_attempts = max(1, int(max_attempts))
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_retry_after, self.timeout = float(max_retry_after), float(timeout)
        self._sleep = sleep if sleep is not None else time.sleep
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), transport=transport,
                                  follow_redirects=False)
        self.requests = 0  # HTTP requests sent (retries included)

    # -- plumbing ----------------------------------------------------------------
    def __repr__(self) -> str:
        key = f"${self.api_key_env}" if self._key else "none"
        return f"ChatClient({self.url!r}, model={self.model!r}, key={key})"

    def _hide(self, text: str) -> str:
        return redact(text, self._secrets)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _bearer(self, request: Any) -> Any:
        """httpx auth: the key as a Bearer token (it takes precedence over credentials in the
        base URL, which httpx would otherwise send as Basic auth)."""
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request

    def _wait(self, state: Any) -> float:
        """tenacity's wait: the server's Retry-After if it gave one, else exponential."""
        err = state.outcome.exception() if state.outcome is not None else None
        if isinstance(err, _Retryable) and err.retry_after is not None:
            return err.retry_after
        return min(self.max_backoff, self.backoff * 2.0 ** (state.attempt_number - 1))

    def _before_sleep(self, state: Any) -> None:
        err = state.outcome.exception()
        why = err.why if isinstance(err, _Retryable) else type(err).__name__
        log.warning("chat endpoint %s: %s; retry %d of %d in %.1f s", self.url, why,
                    state.attempt_number, self.max_attempts - 1, state.next_action.sleep)

    def _attempt(self, body: bytes) -> Any:
        httpx, _ = _deps()
        self.requests += 1
        try:
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            if self._key:
                r = self._http.post(self._url, content=body, headers=headers, auth=self._bearer)
            else:  # credentials in the base URL, if any, go as Basic auth
                r = self._http.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise _Retryable(f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as e:
            raise _Retryable(f"{type(e).__name__}: {self._hide(_one_line(str(e)))}") from None
        if r.status_code >= 400:
            text = self._hide(_one_line(r.text))
            why = f"HTTP {r.status_code}" + (f": {text}" if text else "")
            if r.status_code in RETRY_STATUSES or r.status_code >= 500:
                ra = parse_retry_after(r.headers.get("Retry-After"))
                if ra is not None and ra > self.max_retry_after:
                    raise _Fatal(f"{why} (the server asks to retry after {ra:.0f} s, more "
                                 f"than {self.max_retry_after:g} s)")
                raise _Retryable(why, ra)
            raise _Fatal(why)
        try:
            return r.json()
        except (ValueError, UnicodeDecodeError):
            raise _Fatal(f"answer is not JSON: {self._hide(_one_line(r.text, 100))}") from None

    def post(self, payload: dict) -> Any:
        """POST ``payload`` (plus ``model``) as JSON; the decoded JSON answer, with retries.

        Raises:
            LLMError: a client error (not retried), a non-JSON answer, or every attempt
                failed; one line, secrets redacted.
        """
        _, tenacity = _deps()
        body = json.dumps({"model": self.model, **payload}).encode("utf-8")
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=self._before_sleep,
            sleep=self._sleep,
            reraise=True,
        )
        failure: str | None = None
        try:
            return retrying(self._attempt, body)
        except _Fatal as e:
            failure = str(e)
        except _Retryable as e:
            n = self.max_attempts
            failure = f"no answer after {n} attempt{'s' if n > 1 else ''}: {e.why}"
        # raised outside the handlers: no chained exception can carry a secret
        raise LLMError(f"chat endpoint {self.url}: {failure}")

    def chat(self, content: str | list[dict], *, temperature: float | None = None,
             max_tokens: int | None = None) -> str:
        """One user message (text, or content parts such as images) -> the answer's text.

        Content parts in the answer are joined with spaces. Raises :class:`LLMError`."""
        payload: dict[str, Any] = {"messages": [{"role": "user", "content": content}]}
        if temperature is not None:
            payload["temperature"] = temperature
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        d = self.post(payload)
        try:
            msg = d["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"chat endpoint {self.url}: unexpected answer (no "
                           "choices[0].message.content)") from None
        if isinstance(msg, list):
            msg = " ".join(p.get("text", "") for p in msg if isinstance(p, dict))
        if not isinstance(msg, str):
            raise LLMError(f"chat endpoint {self.url}: unexpected answer (content is "
                           f"{type(msg).__name__})")
        return msg


__all__ = ["ChatClient", "DEFAULT_API_KEY_ENV", "LLMError", "RETRY_STATUSES", "parse_retry_after",
           "redact", "url_secrets"]
