"""Shared by the Kubernetes tests: a strict validator at a fixed Kubernetes version."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest

# 1.29 is the oldest release with native sidecars (init containers with restartPolicy
# Always) on by default, so the manifests must not need anything newer.
KUBERNETES_VERSION = "1.29.0"


def _validate(resource: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{resource.get('kind')} {where}: {e.message}", pytrace=False)


@pytest.fixture
def k8s_validate() -> Callable[[dict[str, Any]], None]:
    """Validate one resource against the Kubernetes OpenAPI schema, unknown fields rejected."""
    return _validate
