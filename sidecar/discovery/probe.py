"""The probes: a small HTTP client that keeps to one host and to a budget.

Every request is counted against `max_requests` and the whole run against a
deadline; a redirect is followed only when it stays on the same scheme, host
and port (a document that moved is found, a credential never leaves the host).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

_MAX_BODY = 8 * 1024 * 1024
_REDIRECTS = 3


class OutOfBudget(Exception):
    """The probe budget (requests or time) is spent."""


@dataclass(frozen=True, slots=True)
class Answer:
    url: str
    status: int
    headers: dict[str, str]  # lower-case names; the last value of each
    body: bytes

    @property
    def media(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass
class Prober:
    base: str  # the API's base URL, without a trailing slash
    headers: dict[str, str]
    max_requests: int
    deadline: float  # time.monotonic() when the run stops
    sent: int = 0
    lines: list[str] = field(default_factory=list)  # what was tried, one line each
    session: aiohttp.ClientSession | None = None

    def url(self, path: str) -> str:
        """A path under the base URL (`/openapi.json`), or an absolute same-host URL."""
        if "://" in path:
            return path
        return self.base + (path if path.startswith("/") else "/" + path)

    def same_origin(self, url: str) -> bool:
        a, b = urlsplit(self.base), urlsplit(url)
        return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)

    def note(self, line: str) -> None:
        self.lines.append(line)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        what: str = "",
    ) -> Answer | None:
        """The answer, or None when the host could not be reached (noted)."""
        url = self.url(path)
        for _ in range(_REDIRECTS + 1):
            answer = await self._once(method, url, body, headers)
            shown = urlsplit(url).path or "/"
            if answer is None:
                self.note(f"{method} {shown}{what}: no answer")
                return None
            location = answer.headers.get("location")
            if answer.status in (301, 302, 303, 307, 308) and location:
                target = urljoin(url, location)
                if not self.same_origin(target):
                    self.note(
                        f"{method} {shown}{what}: {answer.status}, "
                        "a redirect off the host, not followed"
                    )
                    return answer
                if answer.status == 303 or (answer.status in (301, 302) and method == "POST"):
                    method, body = "GET", None
                url = target
                continue
            self.note(f"{method} {shown}{what}: {answer.status} {answer.media or '-'}")
            return answer
        self.note(f"{method} {urlsplit(self.url(path)).path or '/'}{what}: too many redirects")
        return None

    async def _once(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str] | None
    ) -> Answer | None:
        if self.sent >= self.max_requests:
            raise OutOfBudget(f"{self.max_requests} requests")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfBudget("the time limit")
        self.sent += 1
        if self.session is None:
            raise RuntimeError("Prober.session is opened by the caller")
        sent_headers = {**self.headers, **(headers or {})}
        try:
            async with self.session.request(
                method,
                url,
                data=body,
                headers=sent_headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=min(left, 10.0)),
            ) as resp:
                data = await resp.content.read(_MAX_BODY)
                return Answer(
                    url=url,
                    status=resp.status,
                    headers={k.lower(): v for k, v in resp.headers.items()},
                    body=data,
                )
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
