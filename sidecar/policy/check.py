"""The `check:` part of a service: the cheap probe `sidecar check` sends."""

from __future__ import annotations

from pydantic import Field

from .base import Model


class Check(Model):
    path: str = Field(
        default="/",
        pattern=r"^/",
        description="Probed path, under the upstream's base path (default: the base path)",
    )
    method: str = Field(default="GET", description="Probe method; no body is sent")
    expect: list[int] | None = Field(
        default=None,
        description="Statuses meaning the credential was accepted (default: any below 500 "
        "except 401 and 403)",
    )
