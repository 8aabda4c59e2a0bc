"""What the OpenAPI tests share: a sidecar enforcing a document written inline."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import StartSidecar, echo_app


async def enforcing(start_sidecar: StartSidecar, upstream: Any, document: dict[str, Any]) -> str:
    """The URL of a sidecar refusing requests `document` does not allow, in front of an
    upstream echoing what reaches it."""
    api = await upstream(echo_app())
    sc = await start_sidecar(
        {
            "policy.yaml": f"""
                version: 1
                services:
                  api:
                    upstream: {api}
                    openapi: openapi.json
                    validate: {{requests: enforce}}
                """,
            "openapi.json": json.dumps(document),
        }
    )
    return sc.url
