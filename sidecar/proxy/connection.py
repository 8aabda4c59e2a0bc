"""The egress listener's connections: what is decided before a request is parsed.

The rules are plain values (bytes, a constant, a keyword argument), so any
data plane can apply them the same way:

- Request bodies reach the upstream as the agent sent them: never decoded per
  their Content-Encoding (`REQUEST_PARSER`), so Content-Length still matches and
  `max_body` counts the bytes on the wire.
- The sidecar speaks HTTP/1.1 only: a connection that opens with the HTTP/2
  preface gets `HTTP2_REFUSAL` (505 problem+json) and is closed.
- The sidecar's own answers say `Server: agent-sidecar`, also aiohttp's own
  400s for a request it cannot parse.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..headers import SERVER
from .listener import refusal_bytes

log = logging.getLogger("sidecar.proxy")

# Keyword arguments for the HTTP/1.1 request parser.
REQUEST_PARSER: dict[str, Any] = {"auto_decompress": False}

# The start of the HTTP/2 connection preface (RFC 9113 3.4), what
# `curl --http2-prior-knowledge` and other h2c clients open with.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"


# Written whole to a connection that opens with HTTP2_PREFACE, which is then closed.
HTTP2_REFUSAL = refusal_bytes(
    505,
    "The sidecar speaks HTTP/1.1 only; send the request over HTTP/1.1 "
    "(not HTTP/2 prior knowledge, h2c).",
)


class EgressConnection(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, refusing HTTP/2 on a connection's first bytes."""

    __slots__ = ("_fresh",)

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fresh = True

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            self._fresh = False
            if data.startswith(HTTP2_PREFACE) and self.transport is not None:
                log.info("refused an HTTP/2 connection: the sidecar speaks HTTP/1.1 only")
                self.transport.write(HTTP2_REFUSAL)
                self.transport.close()
                return
        super().data_received(data)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        response.headers["Server"] = SERVER
        return response


class EgressServer(web.Server):
    """aiohttp's low-level server, with EgressConnection for each connection."""

    def __call__(self) -> RequestHandler:
        # web.Server keeps its loop and protocol options in these two attributes.
        return EgressConnection(self, loop=self._loop, **self._kwargs)
