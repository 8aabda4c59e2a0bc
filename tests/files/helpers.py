"""What the files tests share: a sidecar serving a directory, and the refusal check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

# Part of every test root's name: it must never reach an answer the agent reads.
CANARY = "root-canary-5c0ffee"


def files_policy(root: Path, **settings: Any) -> str:
    """A policy with one files service, `docs`, serving `root`."""
    options = {"root": str(root), **settings}
    return "version: 1\nservices:\n  docs:\n    files: " + json.dumps(options) + "\n"


def url(base: str, path: str) -> URL:
    """The path sent exactly as written (no normalization of '..', '%2F' or '//')."""
    return URL(base + path, encoded=True)


async def refused(
    response: aiohttp.ClientResponse, status: int, reason: str, root: Path | None = None
) -> dict[str, Any]:
    """The sidecar's own problem+json answer, which never names the root on disk."""
    text = await response.text()
    assert response.status == status, text
    assert response.headers["X-Sidecar-Error"] == reason, text
    assert response.content_type == "application/problem+json"
    assert CANARY not in text and CANARY not in str(response.headers)
    if root is not None:
        assert str(root) not in text
    document: dict[str, Any] = json.loads(text)
    assert document["reason"] == reason
    return document
