"""`services.<name>.openapi` and `validate`: checking calls against an OpenAPI document.

The document itself is read by the loader (loader.py), next to the policy
file that names it, and compiled once per reload (sidecar/openapi/).
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from .base import Model

_FILE_REF = re.compile(r"^\$\{file:([^}]+)\}$")


def _document_path(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(
            "openapi names a file: a path relative to this policy file, or ${file:/path}"
        )
    m = _FILE_REF.match(value)
    if m is not None and not os.path.isabs(m.group(1).strip()):
        raise ValueError(f"a ${{file:}} path must be absolute: {m.group(1).strip()!r}")
    if m is None and "${" in value:
        raise ValueError("openapi takes a file path or ${file:/path}, no other reference")
    return value


DocumentPath = Annotated[
    str,
    AfterValidator(_document_path),
    WithJsonSchema(
        {
            "type": "string",
            "description": "OpenAPI 3.0/3.1 document (JSON or YAML): a path relative to the "
            "policy file, or ${file:/path}",
            "examples": ["openapi/github.json"],
        }
    ),
]


def document_file(value: str, policy_file: str) -> str:
    """Where the document named by `openapi: value` in `policy_file` lives."""
    m = _FILE_REF.match(value)
    if m is not None:
        return m.group(1).strip()
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(policy_file)), value))


def _off(value: object) -> object:
    # YAML 1.1 (PyYAML) reads a bare `off` as false: `requests: off` means "off".
    return "off" if value is False else value


class Validate(Model):
    requests: Annotated[Literal["enforce", "report", "off"], BeforeValidator(_off)] = Field(
        default="enforce",
        description="enforce: a call that breaks the document gets 422 invalid_request and is "
        "not sent; report: it is counted and logged, and sent; off: not checked",
    )
    responses: Annotated[Literal["report", "off"], BeforeValidator(_off)] = Field(
        default="off",
        description="report: count answers whose status or Content-Type the document does not "
        "describe (sidecar_openapi_response_drift), never changing them",
    )
    unknown_operations: Literal["allow", "forbid"] = Field(
        default="allow",
        description="A call matching no operation of the document: sent (allow) or refused with "
        "404 unknown_operation (forbid)",
    )
